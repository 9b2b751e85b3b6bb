"""The Llama family: Llama 2/3, SmolLM2, Mistral, Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm).

Every op goes through the platform's op table and linear layers, and attention through the
backend, so a platform accelerates this model without touching it.
"""
import re
from collections.abc import Iterable

import torch
from plugserve_plugin_api import AttentionBackend, GroupQuantWeight, Platform, PlatformConfig

from plugserve.models.config import ModelConfig
from plugserve.models.rope import cos_sin_table

Tensor = torch.Tensor
Weight = Tensor | GroupQuantWeight

_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Hugging Face projections fused into one matmul each, in output-row order.
# The single projections go through the same path so their optional biases are handled alike.
_FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj"),
          "o_proj": ("o_proj",), "down_proj": ("down_proj",)}
_PART_OF = {part: (fused, i) for fused, parts in _FUSED.items() for i, part in enumerate(parts)}


def _concat_rows(weights: list[Weight]) -> Weight:
    """Stack weights along the output dimension, keeping them quantised when their groups agree."""
    if len(weights) == 1:
        return weights[0]
    if all(isinstance(w, GroupQuantWeight) for w in weights) and len({w.group_size for w in weights}) == 1:
        return GroupQuantWeight(
            q=torch.cat([w.q for w in weights]),
            scale=torch.cat([w.scale.float() for w in weights]),
            minimum=torch.cat([w.minimum.float() for w in weights]),
            group_size=weights[0].group_size,
            bits=max(w.bits for w in weights))  # 4-bit codes are valid 8-bit codes
    dense = [w.dequantize(torch.float32) if isinstance(w, GroupQuantWeight) else w for w in weights]
    return torch.cat(dense)


def _concat_biases(biases: list[Tensor | None], sizes: list[int]) -> Tensor | None:
    if all(b is None for b in biases):
        return None
    if len(biases) == 1:
        return biases[0]
    return torch.cat([torch.zeros(n) if b is None else b.float() for b, n in zip(biases, sizes)])


class LlamaDecoderLayer(torch.nn.Module):
    """Holds one layer's weights; its linears are filled in by ``LlamaForCausalLM.load_weights``."""

    def __init__(self):
        super().__init__()
        self.qkv = self.o_proj = self.gate_up = self.down_proj = None
        self.input_norm = self.post_attention_norm = self.q_norm = self.k_norm = None


class LlamaForCausalLM(torch.nn.Module):
    def __init__(self, config: ModelConfig, platform: Platform, platform_config: PlatformConfig, device,
                 attention_backend: AttentionBackend):
        super().__init__()
        self.config = config
        self.platform = platform
        self.platform_config = platform_config
        self.device = torch.device(device)
        self.dtype = platform_config.dtype
        self.ops = platform.ops()
        self.attn = attention_backend
        self.layers = torch.nn.ModuleList(LlamaDecoderLayer() for _ in range(config.num_layers))
        self.embed_tokens: Tensor | None = None
        self.norm: Tensor | None = None
        self.lm_head = None
        self.cos_sin = cos_sin_table(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                     config.rope_scaling).to(self.device)

    # -- loading ------------------------------------------------------------------------------------

    def _linear(self, weight: Weight, bias: Tensor | None):
        return self.platform.make_linear(weight, bias, self.platform_config, self.device)

    def _dense(self, t: Weight) -> Tensor:
        if isinstance(t, GroupQuantWeight):
            t = t.dequantize(torch.float32)
        return t.to(device=self.device, dtype=self.dtype)

    def load_weights(self, weights: Iterable[tuple[str, Weight]]) -> None:
        """Take weights named as in Hugging Face checkpoints; fuse q/k/v and gate/up as their parts arrive."""
        pending: dict[tuple[int, str], dict[str, Weight]] = {}  # (layer, fused name) -> parts seen so far
        lm_head = None
        for name, tensor in weights:
            if name == "model.embed_tokens.weight":
                self.embed_tokens = self._dense(tensor)
                if self.config.tie_word_embeddings:
                    lm_head = tensor  # maybe quantised: a platform may keep the head quantised
            elif name == "lm_head.weight":
                if not self.config.tie_word_embeddings:
                    lm_head = tensor
            elif name == "model.norm.weight":
                self.norm = self._dense(tensor)
            elif (m := _LAYER_NAME.fullmatch(name)) is not None:
                self._load_layer_weight(int(m[1]), m[2], tensor, pending)
            elif "rotary_emb" not in name:  # some checkpoints store rope buffers; the table is rebuilt here
                raise ValueError(f"unexpected weight {name!r}")
        if pending:
            missing = [f"layer {i} {fused}: has {sorted(parts)}" for (i, fused), parts in pending.items()]
            raise ValueError(f"incomplete fused weights: {'; '.join(missing)}")
        if lm_head is None:
            raise ValueError("no lm_head.weight and no model.embed_tokens.weight to tie it to")
        self.lm_head = self._linear(lm_head, None)
        self._check_loaded()

    def _load_layer_weight(self, i: int, name: str, tensor: Weight, pending: dict) -> None:
        layer = self.layers[i]
        module, _, kind = name.rpartition(".")  # e.g. "self_attn.q_proj", "weight"
        short = module.rpartition(".")[2]
        if short in _PART_OF:
            fused, _ = _PART_OF[short]
            parts = pending.setdefault((i, fused), {})
            parts[f"{short}.{kind}"] = tensor
            names = _FUSED[fused]
            if all(f"{p}.weight" in parts for p in names) and (
                    not self._has_bias(fused) or all(f"{p}.bias" in parts for p in names)):
                del pending[(i, fused)]
                ws = [parts[f"{p}.weight"] for p in names]
                bias = _concat_biases([parts.get(f"{p}.bias") for p in names], [w.shape[0] for w in ws])
                setattr(layer, fused, self._linear(_concat_rows(ws), bias))
        elif short in ("input_layernorm", "post_attention_layernorm", "q_norm", "k_norm"):
            attr = {"input_layernorm": "input_norm", "post_attention_layernorm": "post_attention_norm"}.get(short, short)
            setattr(layer, attr, self._dense(tensor))
        else:
            raise ValueError(f"unexpected weight 'model.layers.{i}.{name}'")

    def _has_bias(self, fused: str) -> bool:
        return (fused == "qkv" and self.config.attention_bias) or (fused == "o_proj" and self.config.o_proj_bias)

    def _check_loaded(self) -> None:
        required = ["qkv", "o_proj", "gate_up", "down_proj", "input_norm", "post_attention_norm"]
        if self.config.qk_norm:
            required += ["q_norm", "k_norm"]
        for i, layer in enumerate(self.layers):
            missing = [a for a in required if getattr(layer, a) is None]
            if missing:
                raise ValueError(f"layer {i} is missing weights: {', '.join(missing)}")
        if self.embed_tokens is None or self.norm is None:
            raise ValueError("missing model.embed_tokens.weight or model.norm.weight")

    # -- running ------------------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, positions: Tensor, kv_caches: list[Tensor], attn_metadata) -> Tensor:
        """input_ids, positions: [T]; returns the final-normed hidden states [T, hidden]."""
        c, ops = self.config, self.ops
        num_tokens = input_ids.shape[0]
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        hidden = self.embed_tokens[input_ids]
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            if residual is None:
                residual = hidden
                x = ops.rms_norm(hidden, layer.input_norm, c.rms_norm_eps)
            else:
                x, residual = ops.add_rms_norm(hidden, residual, layer.input_norm, c.rms_norm_eps)
            q, k, v = layer.qkv(x).split([q_size, kv_size, kv_size], dim=-1)
            q = q.view(num_tokens, c.num_heads, c.head_dim)
            k = k.view(num_tokens, c.num_kv_heads, c.head_dim)
            v = v.view(num_tokens, c.num_kv_heads, c.head_dim)
            if c.qk_norm:
                q = ops.rms_norm(q, layer.q_norm, c.rms_norm_eps)
                k = ops.rms_norm(k, layer.k_norm, c.rms_norm_eps)
            q, k = ops.rotary(positions, q, k, self.cos_sin)
            attn = self.attn.forward(q, k, v, kv_cache, attn_metadata)
            hidden = layer.o_proj(attn.reshape(num_tokens, q_size))
            x, residual = ops.add_rms_norm(hidden, residual, layer.post_attention_norm, c.rms_norm_eps)
            hidden = layer.down_proj(ops.silu_and_mul(layer.gate_up(x)))
        out, _ = ops.add_rms_norm(hidden, residual, self.norm, c.rms_norm_eps)
        return out

    def compute_logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden).float()
