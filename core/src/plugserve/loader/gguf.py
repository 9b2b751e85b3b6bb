"""GGUF files: metadata and tensors read straight from a memory map, a tokenizer built from the metadata.

The format is small enough to parse directly, and doing so is several times faster than
``gguf.GGUFReader``, which builds a numpy view per vocabulary string.
"""
import mmap
import os
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from plugserve_plugin_api import GroupQuantWeight

from plugserve.loader import ModelLoadError, ModelSource, progress
from plugserve.models.config import ModelConfig

# ggml type ids read here without the gguf package; anything else is dequantised by gguf.quants.
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
_DENSE = {F32: (np.float32, torch.float32), F16: (np.float16, torch.float16), BF16: (np.int16, torch.bfloat16)}
_BLOCKS = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q4_0: (32, 18), Q4_1: (32, 20), Q8_0: (32, 34)}  # (values, bytes)

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# llama.cpp interleaves the rotary halves of q/k rows for these; Hugging Face's layout is restored on load.
_PERMUTED_ARCHITECTURES = {"llama", "mistral"}

_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: rows first
    ggml_type: int
    offset: int             # absolute, in the file


class GGUFFile:
    """A parsed GGUF file: ``metadata`` (dict), ``tensors`` (name -> TensorInfo), raw bytes via ``raw``."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
            raise ModelLoadError(f"{path}: cannot open as GGUF: {e}") from e
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, ValueError, IndexError) as e:
            raise ModelLoadError(f"{path}: malformed GGUF file ({e})") from e

    def _parse(self) -> None:
        buf = self._map
        if buf[:4] != b"GGUF":
            raise ModelLoadError(f"{self.path}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ModelLoadError(f"{self.path}: unsupported GGUF version {version}")
        self._pos = 24
        self.metadata = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._u32())
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._u32()
            dims = struct.unpack_from(f"<{n_dims}Q", buf, self._pos)
            self._pos += 8 * n_dims
            ggml_type = self._u32()
            (offset,) = struct.unpack_from("<Q", buf, self._pos)
            self._pos += 8
            infos.append((name, tuple(reversed(dims)), ggml_type, offset))
        align = self.metadata.get("general.alignment", 32)
        data_start = -(-self._pos // align) * align
        self.tensors = {name: TensorInfo(name, shape, t, data_start + off) for name, shape, t, off in infos}
        for info in self.tensors.values():
            end = info.offset + self.nbytes(info)
            if end > len(buf):
                raise ModelLoadError(f"{self.path}: truncated: tensor {info.name} ends at byte {end}, "
                                     f"the file has {len(buf)}")

    def _u32(self) -> int:
        (v,) = struct.unpack_from("<I", self._map, self._pos)
        self._pos += 4
        return v

    def _string(self) -> str:
        (n,) = struct.unpack_from("<Q", self._map, self._pos)
        start = self._pos + 8
        if start + n > len(self._map):
            raise ValueError(f"string at byte {self._pos} runs past the end of the file")
        self._pos = start + n
        return self._map[start:self._pos].decode("utf-8")

    def _value(self, vtype: int):
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            item_type = self._u32()
            (count,) = struct.unpack_from("<Q", self._map, self._pos)
            self._pos += 8
            if item_type in _NUMPY:
                arr = np.frombuffer(self._map, dtype=_NUMPY[item_type], count=count, offset=self._pos)
                self._pos += arr.nbytes
                return arr.tolist()
            return [self._value(item_type) for _ in range(count)]
        if vtype not in _SCALAR:
            raise ValueError(f"unknown metadata value type {vtype} at byte {self._pos}")
        (v,) = struct.unpack_from(_SCALAR[vtype], self._map, self._pos)
        self._pos += struct.calcsize(_SCALAR[vtype])
        return v

    @staticmethod
    def _block(ggml_type: int) -> tuple[int, int]:
        if ggml_type in _BLOCKS:
            return _BLOCKS[ggml_type]
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]

    def nbytes(self, info: TensorInfo) -> int:
        values, size = self._block(info.ggml_type)
        return int(np.prod(info.shape)) // values * size

    def raw(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes as uint8 [rows, bytes per row], a read-only view of the map."""
        row_bytes = info.shape[-1] // self._block(info.ggml_type)[0] * self._block(info.ggml_type)[1]
        flat = np.frombuffer(self._map, dtype=np.uint8, count=self.nbytes(info), offset=info.offset)
        return flat.reshape(-1, row_bytes)

    def weight(self, info: TensorInfo) -> "torch.Tensor | GroupQuantWeight":
        """Dense types as tensors over the map, Q4_0/Q4_1/Q8_0 as GroupQuantWeight, others dequantised to fp32."""
        raw = self.raw(info)
        if info.ggml_type in _DENSE:
            np_dtype, torch_dtype = _DENSE[info.ggml_type]
            return _readonly_tensor(raw.view(np_dtype)).view(torch_dtype).reshape(info.shape)
        if info.ggml_type in (Q4_0, Q4_1, Q8_0):
            return group_quant_from_blocks(raw, info.ggml_type)
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize
        try:
            values = dequantize(raw, GGMLQuantizationType(info.ggml_type))
        except (NotImplementedError, ValueError) as e:
            raise ModelLoadError(f"{self.path}: tensor {info.name} has unsupported type {info.ggml_type}: {e}") from e
        return torch.from_numpy(values).reshape(info.shape)


def _readonly_tensor(a: np.ndarray) -> torch.Tensor:
    # torch warns on read-only numpy arrays; the weights are never written, so share the map as is.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def group_quant_from_blocks(raw: np.ndarray, ggml_type: int) -> GroupQuantWeight:
    """Unpack Q4_0/Q4_1/Q8_0 blocks ([rows, bytes per row] uint8) into w = q * scale + minimum, exactly.

    q is unsigned, so signed codes are shifted: Q4_0 stores q - 8, Q8_0 an int8; the shift moves
    into the minimum (-8 d, -128 d), which fp32 holds exactly.
    """
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, _BLOCKS[ggml_type][1])
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    if ggml_type == Q8_0:
        q = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        minimum, bits = -128 * d, 8
    else:
        packed = blocks[..., 4:] if ggml_type == Q4_1 else blocks[..., 2:]
        # a block's 16 bytes hold values 0-15 in their low nibbles and 16-31 in their high nibbles
        q = np.concatenate((packed & 0x0F, packed >> 4), axis=-1)
        minimum = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if ggml_type == Q4_1 else -8 * d
        bits = 4
    return GroupQuantWeight(torch.from_numpy(q.reshape(rows, -1)), torch.from_numpy(d), torch.from_numpy(minimum),
                            group_size=32, bits=bits)


def _hf_name(gguf_name: str) -> str | None:
    base, _, kind = gguf_name.rpartition(".")
    if base in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[base]}.{kind}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{kind}"
    return None


def _unpermute(w: "torch.Tensor | GroupQuantWeight", n_head: int):
    """Undo llama.cpp's q/k row order (rotary pairs interleaved within each head), as transformers does."""
    def rows(t: torch.Tensor) -> torch.Tensor:
        n = t.shape[0]
        return t.reshape(n_head, n // n_head // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)

    if isinstance(w, GroupQuantWeight):
        return GroupQuantWeight(rows(w.q), rows(w.scale), rows(w.minimum), w.group_size, w.bits)
    return rows(w)


def _config(f: GGUFFile) -> ModelConfig:
    md = f.metadata
    arch = md.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(f"{f.path}: unsupported GGUF architecture {arch!r}; supported: {sorted(_ARCHITECTURES)}")

    def get(key, default=None):
        value = md.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"{f.path}: GGUF metadata lacks {arch}.{key}")
        return value

    hidden, heads = get("embedding_length"), get("attention.head_count")
    scaling = None
    if md.get(f"{arch}.rope.scaling.type") in ("linear", "yarn") and md.get(f"{arch}.rope.scaling.factor", 1.0) != 1.0:
        if md[f"{arch}.rope.scaling.type"] == "yarn":
            raise ModelLoadError(f"{f.path}: yarn rope scaling is not supported")
        scaling = {"rope_type": "linear", "factor": md[f"{arch}.rope.scaling.factor"]}
    eos = md.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=_ARCHITECTURES[arch],
        vocab_size=md.get(f"{arch}.vocab_size") or len(md.get("tokenizer.ggml.tokens", [])),
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"),
        num_heads=heads,
        num_kv_heads=get("attention.head_count_kv", heads),
        head_dim=get("attention.key_length", hidden // heads),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=get("context_length", 4096),
        tie_word_embeddings="output.weight" not in f.tensors,
        attention_bias=arch == "qwen2",
        qk_norm="blk.0.attn_q_norm.weight" in f.tensors,
        eos_token_ids=[] if eos is None else [eos],
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
    )


def _weights(f: GGUFFile, config: ModelConfig):
    permute = f.metadata["general.architecture"] in _PERMUTED_ARCHITECTURES
    for info in f.tensors.values():
        name = _hf_name(info.name)
        if name is None:
            if info.name == "rope_freqs.weight":  # llama.cpp's copy of the llama3 rope factors; the table is rebuilt
                continue
            raise ModelLoadError(f"{f.path}: unknown tensor {info.name!r}")
        w = f.weight(info)
        if permute and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = _unpermute(w, config.num_heads if "q_proj" in name else config.num_kv_heads)
        yield name, w


def load(path: str) -> ModelSource:
    f = GGUFFile(path)
    config = _config(f)
    from plugserve.loader.gguf_tokenizer import build_tokenizer
    tokenizer = build_tokenizer(f.metadata, path)
    weights = progress(_weights(f, config), len(f.tensors), f"loading {os.path.basename(path)}")
    return ModelSource(config, weights, tokenizer, f.metadata.get("tokenizer.chat_template"),
                       config.eos_token_ids, path)
