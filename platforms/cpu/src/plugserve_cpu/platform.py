"""The CPU platform: always usable, lowest priority."""
import platform as host
from dataclasses import replace

import psutil
import torch

from plugserve_plugin_api import (
    REFERENCE_OPS, AttentionBackend, Detection, GroupQuantWeight, Linear, MemoryInfo, Ops, Platform,
    PlatformConfig, ReferenceAttention, ReferenceLinear,
)
from plugserve_cpu.linear import Int4Linear, int4_supported


def _cpu_supports_bf16() -> bool:
    """bf16 is fast only with native support (AVX-512 BF16 or AMX); elsewhere fp32 is the sane default."""
    flags = _cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _cpu_flags() -> set[str]:
    return set((_cpuinfo_field("flags") or "").split())


def _cpuinfo_field(key: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return None


class CpuPlatform(Platform):
    name = "cpu"
    api_requires = ">=1.0,<2"
    device_type = "cpu"
    supported_dtypes = (torch.float32, torch.bfloat16)
    default_dtype = torch.float32
    default_block_size = 16

    @classmethod
    def detect(cls) -> Detection:
        return Detection(usable=True, priority=0, reason="the CPU is always there")

    def init_device(self, rank: int = 0) -> torch.device:
        return torch.device("cpu")

    def describe_device(self) -> str:
        name = _cpuinfo_field("model name") or host.processor() or host.machine()
        return f"{name} ({psutil.cpu_count(logical=True)} threads, torch {torch.get_num_threads()} threads)"

    def memory_info(self) -> MemoryInfo:
        vm = psutil.virtual_memory()
        return MemoryInfo(total=vm.total, free=vm.available, used=vm.total - vm.available)

    def validate_config(self, config: PlatformConfig) -> PlatformConfig:
        if config.dtype is None and _cpu_supports_bf16():
            config = replace(config, dtype=torch.bfloat16)
        return super().validate_config(config)

    def attention_backends(self) -> list[type[AttentionBackend]]:
        return [ReferenceAttention]

    def ops(self) -> Ops:
        return REFERENCE_OPS

    def make_linear(self, weight, bias, config: PlatformConfig, device: torch.device) -> Linear:
        if (isinstance(weight, GroupQuantWeight) and config.quantization == "auto" and int4_supported(weight)):
            return Int4Linear(weight, bias)
        return ReferenceLinear(weight, bias, config.dtype, device)

    def capabilities(self) -> dict:
        return {"quantized_linear": ["int4 weight-only (GGUF Q4_0 / Q4_1)"],
                "bf16_native": _cpu_supports_bf16(), "graph_capture": False}
