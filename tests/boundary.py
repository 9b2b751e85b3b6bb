"""Rule 2 of ARCHITECTURE.md, checked: the core never asks which hardware it is on."""
import re
from pathlib import Path

# Device-type and vendor checks that belong in a platform package, never in the core.
HARDWARE_CHECK = re.compile(
    r"is_cuda|is_hip|is_npu|is_tpu|is_xpu|torch\.cuda\b|torch\.npu\b|torch\.xpu\b|torch\.mps\b|torch\.version\.(hip|cuda)"
    r"|torch_npu|torch_xla|\bjax\b|\btriton\b"
    r"""|\.type\s*[!=]=\s*['"](cuda|cpu|npu|xla|hip|xpu|mps)['"]"""
    r"""|platform(_name)?\s*[!=]=\s*['"]|\.name\s*[!=]=\s*['"](cpu|cuda|rocm|tpu|npu)['"]""")


def hardware_checks(root: Path) -> list[str]:
    """Every line under ``root`` (Python files) that looks like a hardware check, as 'path:line: text'."""
    hits = []
    for path in sorted(root.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if HARDWARE_CHECK.search(code):
                hits.append(f"{path}:{number}: {line.strip()}")
    return hits
