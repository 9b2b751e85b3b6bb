"""Hugging Face model folders: config.json, safetensors (single or sharded), the folder's tokenizer."""
import json
import os

from plugserve.loader import ModelLoadError, ModelSource, progress
from plugserve.models.config import ModelConfig


def read_config(folder: str) -> ModelConfig:
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            raw = json.load(f)
        return ModelConfig.from_hf_dict(raw)
    except FileNotFoundError as e:
        raise ModelLoadError(f"{folder}: no config.json; not a Hugging Face model folder") from e
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{path}: malformed model config ({type(e).__name__}: {e})") from e


def _shards(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index}: malformed safetensors index ({e})") from e
        return [os.path.join(folder, name) for name in files]
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise ModelLoadError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def _weights(shards: list[str]):
    from safetensors import SafetensorError, safe_open
    for shard in shards:
        try:
            # safe_open memory-maps the file: each tensor is read only when asked for
            with safe_open(shard, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{shard}: cannot read safetensors ({e})") from e


def _count(shards: list[str]) -> int:
    from safetensors import safe_open
    total = 0
    for shard in shards:
        try:
            with safe_open(shard, framework="pt") as f:
                total += len(f.keys())
        except Exception as e:
            raise ModelLoadError(f"{shard}: cannot read safetensors ({e})") from e
    return total


def load_tokenizer(folder: str):
    """The folder's tokenizer, or None when it has none (random-weight test models)."""
    if not any(os.path.isfile(os.path.join(folder, n)) for n in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises many types here; all mean the same to the user
        raise ModelLoadError(f"{folder}: cannot load tokenizer ({e})") from e


def load(folder: str) -> ModelSource:
    config = read_config(folder)
    shards = _shards(folder)
    tokenizer = load_tokenizer(folder)
    eos = list(config.eos_token_ids)
    if not eos and tokenizer is not None and tokenizer.eos_token_id is not None:
        eos = [tokenizer.eos_token_id]
    template = getattr(tokenizer, "chat_template", None)
    weights = progress(_weights(shards), _count(shards), f"loading {os.path.basename(folder.rstrip('/'))}")
    return ModelSource(config, weights, tokenizer, template, eos, folder)
