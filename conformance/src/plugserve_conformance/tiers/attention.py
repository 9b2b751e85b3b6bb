"""Attention tier: every backend the platform offers, on paged batches, against a dense causal
attention computed here in float64 (not the plugin API's ReferenceAttention, so a bug shared
with it cannot hide).

A scenario is a batch of sequences, each (context length, new tokens). Tokens before the new
ones are written first by an earlier forward of the same backend, as the engine's prefix cache
or an earlier step would have; the scenario's step then has queries starting mid-sequence.

The KV cache starts filled with a sentinel. After the steps, every block no sequence owns must
still hold only sentinels (catches out-of-bounds writes), and every owned block must hold
exactly its tokens' keys and values: slot by slot when the backend uses the reference layout
[2, blocks, block_size, kv_heads, head_dim], else as a per-block multiset (layout-agnostic).
"""
import random

import torch

from plugserve_plugin_api import AttentionBatch, AttentionSpec
from plugserve_conformance.cases import Case, CaseFailure, Unsupported, check
from plugserve_conformance.numerics import assert_close, dtype_name, tolerance

HEAD_DIMS = (64, 128)
GQA_RATIOS = (1, 3, 4)
BLOCK_SIZES = (16, 32)
LENGTHS_FULL = (1, 7, 8, 9, 15, 16, 17, 127, 128, 129, 1037)
LENGTHS_QUICK = (1, 9, 17, 129)
NUM_KV_HEADS = 2           # >1, so a wrong query-head to KV-head mapping shows
PREFIX_NEW_TOKENS = 7      # new tokens after a cached prefix
SENTINEL = -1024.0         # exact in fp16 / bf16 / fp32, finite (masked reads of it must not poison softmax)
LARGE_LOGIT_OFFSET = 8.0   # q and k centred here give logits ~ offset^2 * sqrt(D): exp overflows unless max-subtracted


def _scenarios(length: int) -> dict[str, list[tuple[int, int]]]:
    return {
        "prefill": [(length, length)],
        # decode of this context, batched with two others so rows of different lengths share a call
        "decode": [(length, 1), (max(1, length // 2), 1), (33, 1)],
        "prefix": [(length + PREFIX_NEW_TOKENS, PREFIX_NEW_TOKENS)],   # prefix-cache hit of `length` tokens
    }


# prefill, decodes, a chunk after a cached prefix and a one-token prompt in one step
MIXED = [(129, 129), (1037, 1), (17, 1), (49, 9), (1, 1), (40, 16)]
MIXED_QUICK = [(129, 129), (257, 1), (17, 1), (49, 9), (1, 1), (40, 16)]  # the float64 reference of 1037 costs ~1 s


def _dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """q: [Q, H, D] at positions start..start+Q-1; k, v: [L, Hkv, D] at 0..L-1. Float64, causal.

    Query head h reads KV head h // (H / Hkv), as Hugging Face's repeat_kv does."""
    heads = q.shape[1]
    ratio = heads // k.shape[1]
    kk = k.double().repeat_interleave(ratio, dim=1).transpose(0, 1)   # [H, L, D]
    vv = v.double().repeat_interleave(ratio, dim=1).transpose(0, 1)
    qq = q.double().transpose(0, 1)                                    # [H, Q, D]
    scores = qq @ kk.transpose(1, 2) * scale                           # [H, Q, L]
    qpos = torch.arange(start, start + q.shape[0])[:, None]
    allowed = torch.arange(k.shape[0])[None, :] <= qpos
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ vv).transpose(0, 1)                   # [Q, H, D]


class _Layout:
    """Random, non-contiguous block assignment with unused blocks between owned ones."""

    def __init__(self, seqs, block_size, seed):
        needed = [-(-ctx // block_size) for ctx, _ in seqs]
        self.num_blocks = 2 * sum(needed) + 3   # block 0 (padding) and about half the rest stay unused
        ids = list(range(1, self.num_blocks))
        random.Random(seed).shuffle(ids)
        width = max(needed) + 1                  # one padding column, as the engine pads with 0
        self.tables = torch.zeros(len(seqs), width, dtype=torch.int64)
        for i, n in enumerate(needed):
            self.tables[i, :n] = torch.tensor(ids[:n])
            ids = ids[n:]
        self.owned = sorted({int(b) for i, n in enumerate(needed) for b in self.tables[i, :n]})
        self.block_size = block_size

    def slot(self, seq: int, pos: int) -> int:
        return int(self.tables[seq, pos // self.block_size]) * self.block_size + pos % self.block_size


def _batch(layout: _Layout, seqs, parts, device) -> AttentionBatch:
    """parts[i] = (first position, count) of sequence i's tokens in this step, or None if absent."""
    present = [i for i, p in enumerate(parts) if p is not None]
    qlens = [parts[i][1] for i in present]
    slens = [parts[i][0] + parts[i][1] for i in present]
    slots = [layout.slot(i, parts[i][0] + j) for i in present for j in range(parts[i][1])]
    starts = [0]
    for n in qlens:
        starts.append(starts[-1] + n)
    return AttentionBatch(
        query_start_loc=torch.tensor(starts, dtype=torch.int64, device=device),
        seq_lens=torch.tensor(slens, dtype=torch.int64, device=device),
        block_tables=layout.tables[present].to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_lens_cpu=qlens, seq_lens_cpu=slens)


def _block_axis(shape: tuple[int, ...], num_blocks: int) -> int | None:
    axes = [i for i, n in enumerate(shape) if n == num_blocks]
    return axes[0] if len(axes) == 1 else None


def _check_cache(cache, spec, layout, seqs, keys, values):
    cache = cache.cpu()
    sentinel = torch.tensor(SENTINEL, dtype=cache.dtype)
    if tuple(cache.shape) == (2, layout.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim):
        flat = cache.view(2, -1, spec.num_kv_heads, spec.head_dim)
        written = torch.zeros(flat.shape[1], dtype=torch.bool)
        for i, (ctx, _) in enumerate(seqs):
            for pos in range(ctx):
                s = layout.slot(i, pos)
                written[s] = True
                if not (torch.equal(flat[0, s], keys[i][pos]) and torch.equal(flat[1, s], values[i][pos])):
                    raise CaseFailure(f"KV cache slot {s} (sequence {i}, position {pos}) "
                                      "does not hold that token's k/v")
        unwritten = (~written).nonzero().flatten()
        stray = unwritten[(flat[:, unwritten] != sentinel).flatten(2).any(-1).any(0)]
        check(len(stray) == 0, f"{len(stray)} unwritten KV cache slots were modified (out-of-bounds write), "
                               f"first at slot {int(stray[0]) if len(stray) else -1}")
        return
    axis = _block_axis(tuple(cache.shape), layout.num_blocks)
    if axis is None:  # no recognisable block axis: only the total count of written values can be checked
        expected = 2 * sum(ctx for ctx, _ in seqs) * spec.num_kv_heads * spec.head_dim
        changed = int((cache != sentinel).sum())
        check(changed == expected, f"{changed} KV cache values changed, expected {expected}")
        return
    for b in range(layout.num_blocks):
        block = cache.select(axis, b)
        changed = block[block != sentinel]
        if b not in layout.owned:
            check(changed.numel() == 0, f"unused KV cache block {b} was written (out-of-bounds write)")
            continue
        toks = [(i, pos) for i, (ctx, _) in enumerate(seqs) for pos in range(ctx)
                if layout.slot(i, pos) // spec.block_size == b]
        want = torch.cat([torch.cat([keys[i][p].flatten(), values[i][p].flatten()]) for i, p in toks])
        check(torch.equal(changed.float().sort().values, want.float().sort().values),
              f"KV cache block {b} does not hold exactly its tokens' keys and values")


def _run_scenario(t, backend_cls, spec: AttentionSpec, seqs, seed: int, offset: float = 0.0):
    reason = backend_cls.unsupported_reason(spec)
    if reason:
        raise Unsupported(f"{backend_cls.name}: {reason}")
    device = t.device
    g = torch.Generator().manual_seed(seed)
    H, Hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) + offset).to(spec.dtype)

    qs = [rnd(ctx, H, D) for ctx, _ in seqs]
    keys = [rnd(ctx, Hkv, D) for ctx, _ in seqs]
    values = [torch.randn(ctx, Hkv, D, generator=g).to(spec.dtype) for ctx, _ in seqs]
    layout = _Layout(seqs, spec.block_size, seed)
    backend = backend_cls(spec)
    cache = torch.full(backend.kv_cache_shape(layout.num_blocks), SENTINEL, dtype=spec.dtype, device=device)

    def step(parts):
        batch = _batch(layout, seqs, parts, device)
        sel = [(i, p) for i, p in enumerate(parts) if p is not None]
        cat = lambda xs: torch.cat([xs[i][p[0]:p[0] + p[1]] for i, p in sel]).to(device)  # noqa: E731
        out = backend.forward(cat(qs), cat(keys), cat(values), cache, backend.prepare(batch))
        refs = [_dense_reference(qs[i][p[0]:p[0] + p[1]], keys[i][:p[0] + p[1]], values[i][:p[0] + p[1]], p[0],
                                 spec.softmax_scale) for i, p in sel]
        return out, torch.cat(refs)

    tol = tolerance(spec.dtype, "attention")
    cached = [(0, ctx - new) if ctx > new else None for ctx, new in seqs]
    outputs = []
    if any(cached):   # the earlier step that put the prefix into the cache
        outputs.append(("attention output (prefix step)", *step(cached)))
    outputs.append(("attention output", *step([(ctx - new, new) for ctx, new in seqs])))
    # The cache first: a bad write also corrupts the output, and the cache check names the slot.
    _check_cache(cache, spec, layout, seqs, keys, values)
    return {"nmse": max(assert_close(name, out, ref, tol, spec.dtype) for name, out, ref in outputs)}


def _case(backend_cls, spec, seqs, seed, offset=0.0):
    return lambda t: _run_scenario(t, backend_cls, spec, seqs, seed, offset)


def cases(target, sweep: str) -> list[Case]:
    quick = sweep == "quick"
    lengths = LENGTHS_QUICK if quick else LENGTHS_FULL
    out = []
    multi = len(target.backends) > 1
    for backend_cls in target.backends:
        prefix = f"attention/{backend_cls.name}/" if multi else "attention/"  # ids stay short for the common case
        for dtype in target.cls.supported_dtypes:
            dt = dtype_name(dtype)
            for head_dim in HEAD_DIMS[:1] if quick else HEAD_DIMS:
                for ratio in (1, 4) if quick else GQA_RATIOS:
                    for bs in BLOCK_SIZES[:1] if quick else BLOCK_SIZES:
                        spec = AttentionSpec(NUM_KV_HEADS * ratio, NUM_KV_HEADS, head_dim, dtype, bs)
                        shape = f"gqa{ratio}-hd{head_dim}-bs{bs}"
                        for length in lengths:
                            for mode, seqs in _scenarios(length).items():
                                key = "ctx" if mode == "decode" else "len"
                                out.append(Case(f"{prefix}{mode}/{shape}-{key}{length}-{dt}", "attention",
                                                _case(backend_cls, spec, seqs, seed=length * 31 + ratio)))
                        mixed = MIXED_QUICK if quick else MIXED
                        out.append(Case(f"{prefix}mixed/{shape}-{dt}", "attention", _case(backend_cls, spec, mixed, 5)))
                spec = AttentionSpec(NUM_KV_HEADS * 4, NUM_KV_HEADS, head_dim, dtype, BLOCK_SIZES[0])
                out.append(Case(f"{prefix}large-logits/gqa4-hd{head_dim}-bs{BLOCK_SIZES[0]}-len129-{dt}", "attention",
                                _case(backend_cls, spec, [(129, 129), (40, 1)], 11, LARGE_LOGIT_OFFSET)))
    return out

