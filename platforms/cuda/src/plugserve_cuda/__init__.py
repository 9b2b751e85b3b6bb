"""plugserve's CUDA platform. Triton is imported only when a kernel is first needed."""
from plugserve_cuda.platform import CudaPlatform

__all__ = ["CudaPlatform"]
