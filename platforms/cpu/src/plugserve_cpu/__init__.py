"""plugserve's CPU platform."""
from plugserve_cpu.platform import CpuPlatform

__all__ = ["CpuPlatform"]
