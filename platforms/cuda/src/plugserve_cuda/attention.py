"""TritonPagedAttention: the CUDA platform's attention backend (kernels in kernels/attention.py).

Importing this module does not import Triton; the kernels load on first ``prepare``.
"""
import importlib.util
from dataclasses import dataclass

import torch

from plugserve_plugin_api import AttentionBackend, AttentionBatch, AttentionSpec

Tensor = torch.Tensor

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PARTITION = 512  # decode context split: at most this many keys per program (flash-decoding)
MIN_PARTITION = 128
TARGET_PROGRAMS = 512  # shrink partitions until a decode step has about this many programs (132 SMs on H200)


@dataclass
class TritonAttentionMetadata:
    slot_mapping: Tensor
    query_start_loc: Tensor
    seq_lens: Tensor
    block_tables: Tensor
    decode_ids: Tensor        # [num_decode] batch indices of sequences with one query
    num_decode: int
    max_splits: int
    partition: int
    prefill_ids: Tensor       # [num_prefill] batch indices of the others
    num_prefill: int
    max_prefill_qlen: int
    part_o: Tensor | None     # decode workspace, shared by all layers of the step
    part_m: Tensor | None
    part_l: Tensor | None


class TritonPagedAttention(AttentionBackend):
    """Paged attention in Triton. KV layout [2, num_blocks, block_size, num_kv_heads, head_dim]
    (the reference's, so either backend can read the other's cache)."""
    name = "triton_paged"

    @classmethod
    def unsupported_reason(cls, spec: AttentionSpec) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if spec.dtype not in _DTYPES:
            return f"dtype {spec.dtype} not supported (bfloat16, float16, float32)"
        d = spec.head_dim
        if d < 16 or d > 256 or d & (d - 1):
            return f"head dim {d} not supported (a power of two from 16 to 256)"
        if spec.num_heads % spec.num_kv_heads:
            return f"{spec.num_heads} query heads are not a multiple of {spec.num_kv_heads} KV heads"
        if spec.block_size < 1 or spec.block_size & (spec.block_size - 1):
            return f"block size {spec.block_size} is not a power of two"
        return None

    def __init__(self, spec: AttentionSpec):
        super().__init__(spec)
        from plugserve_cuda.kernels import attention as kernels
        self._k = kernels

    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        s = self.spec
        return (2, num_blocks, s.block_size, s.num_kv_heads, s.head_dim)

    def prepare(self, batch: AttentionBatch) -> TritonAttentionMetadata:
        device = batch.slot_mapping.device
        decode = [i for i, q in enumerate(batch.query_lens_cpu) if q == 1]
        prefill = [i for i, q in enumerate(batch.query_lens_cpu) if q > 1]
        ids = torch.tensor(decode + prefill, dtype=torch.int32).to(device, non_blocking=True)
        max_splits, partition = 0, PARTITION
        part_o = part_m = part_l = None
        if decode:
            max_ctx = max(batch.seq_lens_cpu[i] for i in decode)
            while partition > MIN_PARTITION and \
                    len(decode) * self.spec.num_kv_heads * -(-max_ctx // partition) < TARGET_PROGRAMS:
                partition //= 2
            max_splits = -(-max_ctx // partition)
            rows = len(decode) * self.spec.num_heads * max_splits
            part_o = torch.empty((rows, self.spec.head_dim), dtype=torch.float32, device=device)
            part_m = torch.empty(rows, dtype=torch.float32, device=device)
            part_l = torch.empty(rows, dtype=torch.float32, device=device)
        return TritonAttentionMetadata(
            slot_mapping=batch.slot_mapping, query_start_loc=batch.query_start_loc, seq_lens=batch.seq_lens,
            block_tables=batch.block_tables, decode_ids=ids[:len(decode)], num_decode=len(decode),
            max_splits=max_splits, partition=partition, prefill_ids=ids[len(decode):], num_prefill=len(prefill),
            max_prefill_qlen=max((batch.query_lens_cpu[i] for i in prefill), default=0),
            part_o=part_o, part_m=part_m, part_l=part_l)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, kv_cache: Tensor, metadata: TritonAttentionMetadata) -> Tensor:
        s, m, kern = self.spec, metadata, self._k
        kern.kv_write(k, v, kv_cache, m.slot_mapping)
        if q.stride(2) != 1:
            q = q.contiguous()
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if m.num_prefill:
            kern.prefill(q, kv_cache, out, m.prefill_ids, m.num_prefill, m.max_prefill_qlen, m.query_start_loc,
                         m.seq_lens, m.block_tables, s.softmax_scale, s.num_kv_heads, s.block_size)
        if m.num_decode:
            kern.decode(q, kv_cache, out, m.decode_ids, m.num_decode, m.max_splits, m.partition, m.query_start_loc,
                        m.seq_lens, m.block_tables, m.part_o, m.part_m, m.part_l, s.softmax_scale, s.num_kv_heads,
                        s.block_size)
        return out
