"""Platform selection through real entry points (rule 6 of ARCHITECTURE.md).

Each test installs fake platform distributions (a module plus a ``.dist-info``
folder with ``entry_points.txt``) into a temporary folder on PYTHONPATH and runs
the real ``plugserve`` CLI in a subprocess, as a user would.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLATFORM_MODULE = """
import torch
from plugserve_plugin_api import Detection, MemoryInfo, Platform, ReferenceAttention, hookimpl

class Fake(Platform):
    name = {name!r}
    api_requires = {api!r}
    device_type = "cpu"
    supported_dtypes = (torch.float32,)
    default_dtype = torch.float32

    @classmethod
    def detect(cls):
        return Detection(usable={usable!r}, priority={priority!r}, reason={reason!r})

    def init_device(self, rank=0):
        return torch.device("cpu")

    def describe_device(self):
        return "fake device " + self.name

    def memory_info(self):
        return MemoryInfo(total=1, free=1, used=0)

    def attention_backends(self):
        return [ReferenceAttention]

@hookimpl
def register_platforms(register):
    register(Fake)
"""


def install_fake(site: Path, name: str, *, priority: int = 10, usable: bool = True, reason: str = "",
                 api: str = ">=1.0,<2", broken: bool = False) -> None:
    module = f"fake_platform_{name}"
    body = "raise ImportError('libfakeaccel.so: cannot open shared object file')\n" if broken else \
        PLATFORM_MODULE.format(name=name, api=api, usable=usable, priority=priority, reason=reason)
    (site / f"{module}.py").write_text(body)
    dist = site / f"plugserve_{name}-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: plugserve-{name}\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text(f"[plugserve.platforms]\n{name} = {module}\n")


def _env(site: Path, env: dict | None) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("PLUGSERVE_PLATFORM", "PLUGSERVE_PLUGINS")}
    return dict(base, PYTHONPATH=str(site), **(env or {}))


def plugserve(site: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = _env(site, env)
    code = "import sys; from plugserve.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], env=full_env, capture_output=True, text=True,
                          timeout=120)


def selected(site: Path, env: dict | None = None, *args: str) -> subprocess.CompletedProcess:
    """Run the selection as the engine does and print the chosen platform's name."""
    full_env = _env(site, env)
    code = textwrap.dedent(f"""
        from plugserve.platforms import load_registry
        print(load_registry().select({args[0] if args else None!r}).name)
    """)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120)


ONLY_FAKES = {"PLUGSERVE_PLUGINS": "alpha,beta,gamma,broken,old"}


@pytest.fixture
def site(tmp_path):
    """A folder on PYTHONPATH that plays the role of site-packages."""
    return tmp_path


def test_highest_priority_usable_platform_wins(site):
    install_fake(site, "alpha", priority=10)
    install_fake(site, "beta", priority=50)
    result = selected(site, ONLY_FAKES)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "beta"


def test_real_cpu_platform_loses_to_a_higher_priority_one(site):
    install_fake(site, "alpha", priority=10)
    result = selected(site, {})
    assert result.stdout.strip() == "alpha", result.stderr


def test_tie_is_an_error_naming_both(site):
    install_fake(site, "alpha", priority=20)
    install_fake(site, "beta", priority=20)
    result = selected(site, ONLY_FAKES)
    assert result.returncode != 0
    assert "alpha" in result.stderr and "beta" in result.stderr and "--platform" in result.stderr


def test_none_usable_is_an_error_with_reasons(site):
    install_fake(site, "alpha", usable=False, reason="no fake accelerator found")
    result = selected(site, ONLY_FAKES)
    assert result.returncode != 0
    assert "no usable platform" in result.stderr and "no fake accelerator found" in result.stderr


def test_explicit_name_wins_over_priority(site):
    install_fake(site, "alpha", priority=10)
    install_fake(site, "beta", priority=50)
    assert selected(site, ONLY_FAKES, "alpha").stdout.strip() == "alpha"
    assert selected(site, dict(ONLY_FAKES, PLUGSERVE_PLATFORM="alpha")).stdout.strip() == "alpha"


def test_unknown_name_lists_installed_platforms(site):
    install_fake(site, "alpha")
    result = plugserve(site, "platforms", "--platform", "no-such")
    assert result.returncode != 0
    assert "unknown platform 'no-such'" in result.stderr
    assert "alpha" in result.stderr and "cpu" in result.stderr


def test_explicit_unusable_platform_says_why(site):
    install_fake(site, "alpha", usable=False, reason="driver 999 required")
    result = selected(site, ONLY_FAKES, "alpha")
    assert result.returncode != 0 and "driver 999 required" in result.stderr


def test_incompatible_api_range_names_package_and_both_versions(site):
    install_fake(site, "old", api=">=0.1,<1")
    report = json.loads(plugserve(site, "platforms", "--json").stdout)
    old = next(p for p in report["platforms"] if p["name"] == "old")
    assert not old["usable"]
    assert "plugserve-old" in old["reason"] and ">=0.1,<1" in old["reason"] and "1.0" in old["reason"]
    result = selected(site, ONLY_FAKES, "old")
    assert result.returncode != 0 and ">=0.1,<1" in result.stderr


def test_plugin_whose_import_raises_is_reported_and_others_still_work(site):
    install_fake(site, "broken", broken=True)
    install_fake(site, "alpha", priority=5)
    result = plugserve(site, "platforms", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [f["package"] for f in report["failed_plugins"]] == ["plugserve-broken"]
    assert "libfakeaccel.so" in report["failed_plugins"][0]["error"]
    assert {p["name"] for p in report["platforms"]} >= {"alpha", "cpu"}
    assert selected(site, {}).stdout.strip() == "alpha"


def test_allowlist_limits_what_is_loaded(site):
    install_fake(site, "alpha", priority=50)
    install_fake(site, "broken", broken=True)
    report = json.loads(plugserve(site, "platforms", "--json", env={"PLUGSERVE_PLUGINS": "cpu"}).stdout)
    assert [p["name"] for p in report["platforms"]] == ["cpu"]
    assert report["failed_plugins"] == []
    assert selected(site, {"PLUGSERVE_PLUGINS": "plugserve-cpu"}).stdout.strip() == "cpu"


def test_cpu_platform_is_usable_and_fully_described(site):
    report = json.loads(plugserve(site, "platforms", "--json", env={"PLUGSERVE_PLUGINS": "cpu"}).stdout)
    (cpu,) = report["platforms"]
    assert cpu["usable"] and cpu["device_type"] == "cpu" and cpu["package"] == "plugserve-cpu"
    assert "float32" in cpu["dtypes"] and cpu["attention_backends"]
