"""The boundary guards work, and the tree passes them."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from boundary import hardware_checks

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(cwd: Path, pythonpath: list[Path]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in pythonpath))
    return subprocess.run([str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_import_contracts_hold():
    result = _lint(ROOT, [])
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_guard_catches_a_platform_import_in_core(tmp_path):
    shutil.copytree(ROOT / "core" / "src" / "plugserve", tmp_path / "plugserve")
    (tmp_path / "plugserve" / "planted.py").write_text("import plugserve_cpu.platform\n")
    result = _lint(ROOT, [tmp_path])
    assert result.returncode != 0
    assert "plugserve.planted -> plugserve_cpu" in result.stdout


def test_import_guard_catches_a_hardware_library_in_core(tmp_path):
    shutil.copytree(ROOT / "core" / "src" / "plugserve", tmp_path / "plugserve")
    (tmp_path / "plugserve" / "planted.py").write_text("def f():\n    import torch_npu\n")
    result = _lint(ROOT, [tmp_path])
    assert result.returncode != 0
    assert "torch_npu" in result.stdout


def test_core_has_no_hardware_checks():
    assert hardware_checks(ROOT / "core" / "src") == []


def test_hardware_check_guard_finds_planted_checks(tmp_path):
    planted = [
        "if torch.cuda.is_available(): pass",
        "if x.device.type == 'cuda': pass",
        "if platform.name == 'npu': pass",
        "if platform_name == \"rocm\": pass",
        "hip = torch.version.hip",
        "import torch_xla",
    ]
    (tmp_path / "m.py").write_text("\n".join(planted) + "\n# torch.cuda in a comment is fine\n")
    hits = hardware_checks(tmp_path)
    assert len(hits) == len(planted), hits
