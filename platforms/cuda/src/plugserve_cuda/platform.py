"""The CUDA platform: NVIDIA GPUs through PyTorch's CUDA build, Triton kernels.

Detection never creates a CUDA context: it reads torch's build flags and the device
count (``cudaGetDeviceCount``, or NVML where ``PYTORCH_NVML_BASED_CUDA_CHECK=1``),
which leave torch's lazy CUDA state uninitialised.
"""
import importlib.util
from dataclasses import replace

import torch

from plugserve_plugin_api import (
    REFERENCE_OPS, AttentionBackend, ConfigError, Detection, Linear, MemoryInfo, Ops, Platform, PlatformConfig,
    ReferenceAttention, ReferenceLinear,
)

from plugserve_cuda.attention import TritonPagedAttention


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


class CudaPlatform(Platform):
    name = "cuda"
    api_requires = ">=1.0,<2"
    device_type = "cuda"
    supported_dtypes = (torch.bfloat16, torch.float16, torch.float32)
    default_dtype = torch.bfloat16
    default_block_size = 16

    def __init__(self):
        self._device: torch.device | None = None

    @classmethod
    def detect(cls) -> Detection:
        if getattr(torch.version, "hip", None):
            return Detection(False, 100, f"torch {torch.__version__} is a ROCm (HIP) build; use the rocm platform")
        if not getattr(torch.version, "cuda", None):
            return Detection(False, 100, f"torch {torch.__version__} is not a CUDA build")
        try:
            count = torch.cuda.device_count()
        except Exception as e:  # a broken driver must not break platform listing
            return Detection(False, 100, f"CUDA device query failed: {e}")
        if count == 0:
            return Detection(False, 100, "torch has CUDA but no CUDA device is visible (driver missing or "
                                          "CUDA_VISIBLE_DEVICES empty)")
        kernels = "Triton kernels" if triton_available() else "no Triton: reference ops and attention"
        return Detection(True, 100, f"{count} CUDA device(s), CUDA {torch.version.cuda}; {kernels}")

    # ---------------------------------------------------------------- device
    def init_device(self, rank: int = 0) -> torch.device:
        index = rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        self._device = torch.device("cuda", index)
        return self._device

    @property
    def device(self) -> torch.device:
        return self._device if self._device is not None else torch.device("cuda", torch.cuda.current_device())

    def describe_device(self) -> str:
        props = torch.cuda.get_device_properties(self.device)
        return f"{props.name} ({props.total_memory // 2**30} GiB, sm_{props.major}{props.minor})"

    def memory_info(self) -> MemoryInfo:
        free, total = torch.cuda.mem_get_info(self.device)
        return MemoryInfo(total=total, free=free, used=total - free)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)

    # ---------------------------------------------------------------- config
    def validate_config(self, config: PlatformConfig) -> PlatformConfig:
        config = super().validate_config(config)
        if config.block_size < 8:
            raise ConfigError(f"platform 'cuda' needs a block size of at least 8, got {config.block_size}")
        return config

    # ---------------------------------------------------------------- kernels
    def attention_backends(self) -> list[type[AttentionBackend]]:
        return [TritonPagedAttention, ReferenceAttention]

    def ops(self) -> Ops:
        if not triton_available():
            return REFERENCE_OPS
        from plugserve_cuda.kernels import ops as k
        return replace(REFERENCE_OPS, rms_norm=k.rms_norm, add_rms_norm=k.add_rms_norm, rotary=k.rotary,
                       silu_and_mul=k.silu_and_mul)

    def make_linear(self, weight, bias, config: PlatformConfig, device: torch.device) -> Linear:
        # Dense cuBLAS matmuls in the compute dtype; quantised weights are dequantised once.
        return ReferenceLinear(weight, bias, config.dtype, device)

    def capabilities(self) -> dict:
        return {"fast_ops": ["rms_norm", "add_rms_norm", "rotary", "silu_and_mul", "kv_write"]
                if triton_available() else [],
                "attention": ["triton_paged (prefill varlen + prefix, split-K decode)", "reference"],
                "quantized_linear": [], "graph_capture": False}
