"""Entry point module: registers the CUDA platform with plugserve."""
from plugserve_plugin_api import hookimpl

from plugserve_cuda.platform import CudaPlatform


@hookimpl
def register_platforms(register):
    register(CudaPlatform)
