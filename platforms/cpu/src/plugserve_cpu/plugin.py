"""Entry point module: registers the CPU platform with plugserve."""
from plugserve_plugin_api import hookimpl

from plugserve_cpu.platform import CpuPlatform


@hookimpl
def register_platforms(register):
    register(CpuPlatform)
