"""Engine configuration: one dataclass, filled from the CLI, the server or the Python API."""
from dataclasses import dataclass, field

import torch

_DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype | None:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(_DTYPES)}") from None


@dataclass
class EngineConfig:
    model: str | None = None              # GGUF file or Hugging Face folder; None: the default SmolLM2 GGUF
    load_format: str = "auto"             # auto | gguf | hf | dummy
    dummy_config: dict | None = None      # model config for load_format="dummy" without a folder
    platform: str | None = None           # None: PLUGSERVE_PLATFORM, else auto-detect
    dtype: str = "auto"
    quantization: str = "auto"            # auto: keep quantised weights quantised where the platform can; none: dense
    block_size: int | None = None         # None: the platform's default
    max_model_len: int | None = None      # None: the model's context length
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048    # the token budget of one step
    chunked_prefill_size: int | None = None
    kv_cache_memory: int | None = None    # bytes; None: kv_cache_memory_fraction of free device memory
    kv_cache_memory_fraction: float = 0.1
    enable_prefix_caching: bool = True
    seed: int = 0
    debug_invariants: bool = False        # check the KV pool after every step (tests turn it on)
    served_model_name: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        parse_dtype(self.dtype)
        if self.quantization not in ("auto", "none"):
            raise ValueError(f"quantization must be 'auto' or 'none', got {self.quantization!r}")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}")
