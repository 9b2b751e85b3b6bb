"""Attention backends: each owns its KV-cache layout and its per-step metadata.

The runner builds one :class:`AttentionBatch` per step; the backend turns it into
metadata once (``prepare``), then every layer calls ``forward`` with that metadata.
``forward`` writes the step's keys and values into the cache, then attends.
"""
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass(frozen=True)
class AttentionSpec:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int
    scale: float | None = None  # None: 1 / sqrt(head_dim)

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else self.head_dim ** -0.5


@dataclass
class AttentionBatch:
    """A step's sequences, flattened: sequence i owns query rows query_start_loc[i]:query_start_loc[i+1].

    Its new tokens sit at the end of its context: query row j of sequence i is at
    position seq_lens[i] - query_lens[i] + j and may attend keys at positions <= that.
    """
    query_start_loc: Tensor   # [B + 1] int64, on device
    seq_lens: Tensor          # [B] int64: context length including this step's tokens
    block_tables: Tensor      # [B, max_blocks] int64, padded with 0
    slot_mapping: Tensor      # [T] int64: cache slot (block * block_size + offset) of each new token
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend(ABC):
    name: ClassVar[str]

    @classmethod
    def unsupported_reason(cls, spec: AttentionSpec) -> str | None:
        """None when this backend can run ``spec``; otherwise why not (head dim, dtype, block size, GQA)."""
        return None

    def __init__(self, spec: AttentionSpec):
        self.spec = spec

    @abstractmethod
    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Shape of one layer's KV cache tensor (dtype spec.dtype) holding ``num_blocks`` blocks."""

    @abstractmethod
    def prepare(self, batch: AttentionBatch) -> Any:
        """Per-step metadata, computed once and passed to every layer's ``forward``."""

    @abstractmethod
    def forward(self, q: Tensor, k: Tensor, v: Tensor, kv_cache: Tensor, metadata: Any) -> Tensor:
        """q: [T, H, D], k and v: [T, Hkv, D]. Write k, v into kv_cache, attend; return [T, H, D]."""


@dataclass
class _Group:
    rows: Tensor          # [G * Q] query rows of this group, sequence-major
    num_seqs: int
    query_len: int
    key_slots: Tensor     # [G, L] cache slots of each sequence's keys (padded)
    mask: Tensor | None   # [G, 1, Q, L] bool, True = attend; None = plain causal, no padding


@dataclass
class _ReferenceMetadata:
    groups: list[_Group]
    slot_mapping: Tensor


class ReferenceAttention(AttentionBackend):
    """Plain-torch paged attention. Layout: [2, num_blocks, block_size, num_kv_heads, head_dim].

    Decode rows (one query each) are attended in one batched call; every other
    sequence in its own call.
    """
    name = "reference"

    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        s = self.spec
        return (2, num_blocks, s.block_size, s.num_kv_heads, s.head_dim)

    def prepare(self, batch: AttentionBatch) -> "_ReferenceMetadata":
        bs = self.spec.block_size
        device = batch.slot_mapping.device
        starts = batch.query_start_loc.tolist()
        decode = [i for i, q in enumerate(batch.query_lens_cpu) if q == 1]
        groups = []
        if decode:
            idx = torch.tensor(decode, device=device)
            max_len = max(batch.seq_lens_cpu[i] for i in decode)
            pos = torch.arange(max_len, device=device)
            tables = batch.block_tables[idx]
            slots = tables.gather(1, (pos // bs).expand(len(decode), -1)) * bs + pos % bs
            mask = (pos.unsqueeze(0) < batch.seq_lens[idx].unsqueeze(1)).view(len(decode), 1, 1, max_len)
            rows = batch.query_start_loc[idx]
            groups.append(_Group(rows, len(decode), 1, slots, mask))
        for i, qlen in enumerate(batch.query_lens_cpu):
            if qlen == 1:
                continue
            seq_len = batch.seq_lens_cpu[i]
            pos = torch.arange(seq_len, device=device)
            slots = (batch.block_tables[i, pos // bs] * bs + pos % bs).unsqueeze(0)
            rows = torch.arange(starts[i], starts[i] + qlen, device=device)
            mask = None
            if seq_len != qlen:  # cached prefix: queries start mid-sequence
                qpos = torch.arange(seq_len - qlen, seq_len, device=device)
                mask = (pos.unsqueeze(0) <= qpos.unsqueeze(1)).view(1, 1, qlen, seq_len)
            groups.append(_Group(rows, 1, qlen, slots, mask))
        return _ReferenceMetadata(groups, batch.slot_mapping)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, kv_cache: Tensor, metadata: "_ReferenceMetadata") -> Tensor:
        self.write_kv(k, v, kv_cache, metadata.slot_mapping)
        return self.attend(q, kv_cache, metadata.groups)

    def write_kv(self, k: Tensor, v: Tensor, kv_cache: Tensor, slot_mapping: Tensor) -> None:
        flat = kv_cache.view(2, -1, self.spec.num_kv_heads, self.spec.head_dim)
        flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
        flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))

    def attend(self, q: Tensor, kv_cache: Tensor, groups: list[_Group]) -> Tensor:
        s = self.spec
        flat = kv_cache.view(2, -1, s.num_kv_heads, s.head_dim)
        out = torch.empty_like(q)
        for g in groups:
            qg = q[g.rows].view(g.num_seqs, g.query_len, s.num_heads, s.head_dim).transpose(1, 2)
            kg = flat[0][g.key_slots].transpose(1, 2)  # [G, Hkv, L, D]
            vg = flat[1][g.key_slots].transpose(1, 2)
            o = F.scaled_dot_product_attention(
                qg, kg, vg, attn_mask=g.mask, is_causal=g.mask is None and g.query_len > 1,
                scale=s.softmax_scale, enable_gqa=s.num_heads != s.num_kv_heads)
            out[g.rows] = o.transpose(1, 2).reshape(-1, s.num_heads, s.head_dim)
        return out
