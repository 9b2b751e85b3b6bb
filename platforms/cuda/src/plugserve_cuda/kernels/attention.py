"""Triton paged attention. KV cache layout: [2, num_blocks, block_size, num_kv_heads, head_dim].

Three kernels and a reduction:
- ``kv_write``: scatters a step's keys and values into their cache slots (slot_mapping);
- ``prefill``: variable-length query tiles of the non-decode sequences, keys read
  through the block table (so a cached prefix is read in place), causal with the
  offset seq_len - query_len (queries may start mid-sequence);
- ``decode``: one query per sequence, the context split into partitions
  (flash-decoding): each program writes its partition's unnormalised output and its
  softmax max / sum; ``reduce`` combines the partitions.
GQA: query head h reads KV head h // (num_heads // num_kv_heads).
Accumulation is fp32 throughout; fp32 inputs use IEEE dot products (no TF32).
"""
import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _kv_write_kernel(k_ptr, k_s0, k_s1, v_ptr, v_s0, v_s1, cache_ptr, v_offset, slot_ptr,
                     NUM_KV_HEADS: tl.constexpr, D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        d = tl.arange(0, D)
        k = tl.load(k_ptr + t * k_s0 + h * k_s1 + d)
        v = tl.load(v_ptr + t * v_s0 + h * v_s1 + d)
        dst = cache_ptr + slot * (NUM_KV_HEADS * D) + h * D + d
        tl.store(dst, k.to(cache_ptr.dtype.element_ty))
        tl.store(dst + v_offset, v.to(cache_ptr.dtype.element_ty))


def kv_write(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    t, hk, d = k.shape
    if t == 0:
        return
    if k.stride(2) != 1:
        k = k.contiguous()
    if v.stride(2) != 1:
        v = v.contiguous()
    _kv_write_kernel[(t, hk)](k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1), kv_cache,
                              kv_cache.stride(0), slot_mapping, NUM_KV_HEADS=hk, D=d)


@triton.jit
def _prefill_kernel(q_ptr, q_s0, q_s1, cache_ptr, v_offset, out_ptr, o_s0, o_s1,
                    seq_ids_ptr, qsl_ptr, seq_lens_ptr, bt_ptr, bt_stride, qk_scale,
                    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(seq_ids_ptr + tl.program_id(2)).to(tl.int64)
    q_start = tl.load(qsl_ptr + seq)
    qlen = tl.load(qsl_ptr + seq + 1) - q_start
    if pid_m * BLOCK_M < qlen:
        ctx = tl.load(seq_lens_ptr + seq)
        hk = h // GROUP
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < qlen
        qpos = ctx - qlen + offs_m
        d = tl.arange(0, D)
        q = tl.load(q_ptr + (q_start + offs_m)[:, None] * q_s0 + h * q_s1 + d[None, :],
                    mask=m_mask[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        kv_end = tl.minimum(ctx, ctx - qlen + (pid_m + 1) * BLOCK_M)
        for start in range(0, kv_end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_mask = offs_n < kv_end
            blk = tl.load(bt_ptr + seq * bt_stride + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
            slot = blk * PAGE + offs_n % PAGE
            kaddr = cache_ptr + slot[:, None] * (NUM_KV_HEADS * D) + hk * D + d[None, :]
            k = tl.load(kaddr, mask=n_mask[:, None], other=0.0)
            v = tl.load(kaddr + v_offset, mask=n_mask[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * qk_scale
            causal = (offs_n[None, :] <= qpos[:, None]) & n_mask[None, :]
            s = tl.where(causal, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(out_ptr + (q_start + offs_m)[:, None] * o_s0 + h * o_s1 + d[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])


@triton.jit
def _decode_kernel(q_ptr, q_s0, q_s1, cache_ptr, v_offset, seq_ids_ptr, qsl_ptr, seq_lens_ptr, bt_ptr, bt_stride,
                   part_o_ptr, part_m_ptr, part_l_ptr, qk_scale, num_heads, max_splits,
                   NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, PAGE: tl.constexpr,
                   D: tl.constexpr, BLOCK_N: tl.constexpr, PARTITION: tl.constexpr, IEEE: tl.constexpr):
    # One program: one sequence, one KV head (all GROUP query heads of it, packed as the M
    # dimension of the dot products, so each key and value is read once), one partition.
    i = tl.program_id(0)
    hk = tl.program_id(1)
    sp = tl.program_id(2)
    seq = tl.load(seq_ids_ptr + i).to(tl.int64)
    ctx = tl.load(seq_lens_ptr + seq)
    p_start = sp * PARTITION
    if p_start < ctx:
        row = tl.load(qsl_ptr + seq)
        p_end = tl.minimum(ctx, p_start + PARTITION)
        d = tl.arange(0, D)
        g = tl.arange(0, BLOCK_G)
        g_mask = g < GROUP
        h = hk * GROUP + g
        q = tl.load(q_ptr + row * q_s0 + h[:, None] * q_s1 + d[None, :], mask=g_mask[:, None], other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        for start in range(p_start, p_end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_mask = offs_n < p_end
            blk = tl.load(bt_ptr + seq * bt_stride + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
            slot = blk * PAGE + offs_n % PAGE
            kaddr = cache_ptr + slot[:, None] * (NUM_KV_HEADS * D) + hk * D + d[None, :]
            k = tl.load(kaddr, mask=n_mask[:, None], other=0.0)
            v = tl.load(kaddr + v_offset, mask=n_mask[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        base = (i * num_heads + h) * max_splits + sp
        tl.store(part_o_ptr + base[:, None] * D + d[None, :], acc, mask=g_mask[:, None])
        tl.store(part_m_ptr + base, m_i, mask=g_mask)
        tl.store(part_l_ptr + base, l_i, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(out_ptr, o_s0, o_s1, seq_ids_ptr, qsl_ptr, seq_lens_ptr, part_o_ptr, part_m_ptr,
                          part_l_ptr, num_heads, max_splits,
                          D: tl.constexpr, PARTITION: tl.constexpr, SPLITS_P2: tl.constexpr):
    i = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(seq_ids_ptr + i).to(tl.int64)
    ctx = tl.load(seq_lens_ptr + seq)
    row = tl.load(qsl_ptr + seq)
    n_splits = tl.cdiv(ctx, PARTITION)
    sp = tl.arange(0, SPLITS_P2)
    mask = sp < n_splits
    base = (i * num_heads + h) * max_splits
    m = tl.load(part_m_ptr + base + sp, mask=mask, other=float("-inf"))
    l = tl.load(part_l_ptr + base + sp, mask=mask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(mask, tl.exp2(m - m_max), 0.0)
    denom = tl.sum(w * l, 0)
    d = tl.arange(0, D)
    o = tl.load(part_o_ptr + (base + sp)[:, None] * D + d[None, :], mask=mask[:, None], other=0.0)
    out = tl.sum(w[:, None] * o, 0) / denom
    tl.store(out_ptr + row * o_s0 + h * o_s1 + d, out.to(out_ptr.dtype.element_ty))


def prefill(q, kv_cache, out, seq_ids, num_seqs, max_qlen, query_start_loc, seq_lens, block_tables,
            scale, num_kv_heads, page):
    t, h, d = q.shape
    ieee = q.dtype == torch.float32
    block_m, block_n, stages = (32, 32, 1) if ieee else (64, 64, 2)
    grid = (triton.cdiv(max_qlen, block_m), h, num_seqs)
    _prefill_kernel[grid](q, q.stride(0), q.stride(1), kv_cache, kv_cache.stride(0), out, out.stride(0),
                          out.stride(1), seq_ids, query_start_loc, seq_lens, block_tables, block_tables.stride(0),
                          scale * LOG2E, NUM_KV_HEADS=num_kv_heads, GROUP=h // num_kv_heads, PAGE=page, D=d,
                          BLOCK_M=block_m, BLOCK_N=block_n, IEEE=ieee, num_warps=4, num_stages=stages)


def decode(q, kv_cache, out, seq_ids, num_seqs, max_splits, partition, query_start_loc, seq_lens, block_tables,
           part_o, part_m, part_l, scale, num_kv_heads, page):
    t, h, d = q.shape
    ieee = q.dtype == torch.float32
    group = h // num_kv_heads
    _decode_kernel[(num_seqs, num_kv_heads, max_splits)](
        q, q.stride(0), q.stride(1), kv_cache, kv_cache.stride(0), seq_ids, query_start_loc, seq_lens,
        block_tables, block_tables.stride(0), part_o, part_m, part_l, scale * LOG2E, h, max_splits,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), PAGE=page, D=d,
        BLOCK_N=32 if ieee else 64, PARTITION=partition, IEEE=ieee, num_warps=4, num_stages=1 if ieee else 2)
    _decode_reduce_kernel[(num_seqs, h)](
        out, out.stride(0), out.stride(1), seq_ids, query_start_loc, seq_lens, part_o, part_m, part_l, h,
        max_splits, D=d, PARTITION=partition, SPLITS_P2=triton.next_power_of_2(max_splits), num_warps=4)
