"""The platform contract: what the core asks a platform, and nothing it does not ask."""
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from plugserve_plugin_api.attention import AttentionBackend
from plugserve_plugin_api.ops import REFERENCE_OPS, Ops
from plugserve_plugin_api.quant import GroupQuantWeight, Linear, ReferenceLinear


class ConfigError(ValueError):
    """The platform cannot run this configuration; the message says why and what to change."""


@dataclass(frozen=True)
class Detection:
    """Whether a platform can run here, found without initialising any device."""
    usable: bool
    priority: int = 0
    reason: str = ""


@dataclass(frozen=True)
class MemoryInfo:
    total: int  # bytes
    free: int
    used: int


@dataclass(frozen=True)
class PlatformConfig:
    """The part of the engine configuration a platform validates and may adjust."""
    dtype: torch.dtype | None = None      # None: the platform's default
    block_size: int | None = None         # None: the platform's default
    quantization: str = "auto"            # "auto": keep quantised weights quantised where supported; "none": dense
    max_num_seqs: int = 256
    max_model_len: int = 8192
    extra: dict = field(default_factory=dict)

    def replace(self, **changes) -> "PlatformConfig":
        return replace(self, **changes)


class Platform(ABC):
    """Subclass this, set the class attributes, implement the abstract methods.

    Construction must not initialise a device; ``init_device`` does, once per worker.
    """
    name: ClassVar[str]
    api_requires: ClassVar[str]          # PEP 440 range of plugin API versions, e.g. ">=1.0,<2"
    device_type: ClassVar[str]           # torch device type, e.g. "cpu", "cuda"
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]]
    default_dtype: ClassVar[torch.dtype]
    default_block_size: ClassVar[int] = 16

    @classmethod
    @abstractmethod
    def detect(cls) -> Detection:
        """Can this platform run here, and with what priority? Must not initialise a device."""

    @abstractmethod
    def init_device(self, rank: int = 0) -> torch.device:
        """Initialise the device for the worker of this rank and return it."""

    @abstractmethod
    def describe_device(self) -> str:
        """One line naming the device, e.g. "NVIDIA H200 (139 GiB)"."""

    @abstractmethod
    def memory_info(self) -> MemoryInfo:
        """Memory of the device the KV cache lives on."""

    def validate_config(self, config: PlatformConfig) -> PlatformConfig:
        """Return the config with defaults filled in, or raise ConfigError naming what is wrong."""
        dtype = config.dtype or self.default_dtype
        if dtype not in self.supported_dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.supported_dtypes)
            raise ConfigError(f"platform {self.name!r} does not support dtype {str(dtype).removeprefix('torch.')}; "
                              f"supported: {names}")
        block_size = config.block_size or self.default_block_size
        if block_size <= 0 or block_size & (block_size - 1):
            raise ConfigError(f"block size must be a positive power of two, got {block_size}")
        return config.replace(dtype=dtype, block_size=block_size)

    @abstractmethod
    def attention_backends(self) -> list[type[AttentionBackend]]:
        """Attention backends in priority order; the first whose ``unsupported_reason`` is None is used."""

    def ops(self) -> Ops:
        """The op table; the default is the plain-torch reference for every op."""
        return REFERENCE_OPS

    def make_linear(self, weight: "torch.Tensor | GroupQuantWeight", bias: torch.Tensor | None,
                    config: PlatformConfig, device: torch.device) -> Linear:
        """A linear layer for these weights; quantised weights may stay quantised if config.quantization allows."""
        return ReferenceLinear(weight, bias, config.dtype, device)

    def synchronize(self) -> None:
        """Wait for queued device work (used around timings)."""

    def seed(self, seed: int) -> None:
        """Seed the platform's random generators."""
        torch.manual_seed(seed)

    def capabilities(self) -> dict:
        """Extra facts for ``plugserve platforms`` (fast ops, quantised formats, ...)."""
        return {}
