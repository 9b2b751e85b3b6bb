"""Triton versions of the op table's element-wise ops.

Each matches its plain-torch reference in plugserve_plugin_api.ops: fp32 compute, and
results rounded to the input dtype at the same points the reference rounds them.
"""
import torch
import triton
import triton.language as tl

Tensor = torch.Tensor


def _rows(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@triton.jit
def _rms_norm_kernel(x_ptr, x_stride, w_ptr, out_ptr, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    y = (x * rstd) * w
    tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_kernel(x_ptr, x_stride, r_ptr, r_stride, w_ptr, out_ptr, sum_ptr, n_cols, eps,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * r_stride + cols, mask=mask, other=0.0).to(tl.float32)
    s = (x + r).to(sum_ptr.dtype.element_ty)   # the reference rounds the sum to the input dtype
    tl.store(sum_ptr + row * n_cols + cols, s, mask=mask)
    sf = s.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(sf * sf, axis=0) / n_cols + eps)
    tl.store(out_ptr + row * n_cols + cols, ((sf * rstd) * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    shape, n = x.shape, x.shape[-1]
    x2 = _rows(x)
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, x2.stride(0), weight, out, n, eps, BLOCK=triton.next_power_of_2(n))
    return out.view(shape)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    shape, n = x.shape, x.shape[-1]
    x2, r2 = _rows(x), _rows(residual)
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    summed = torch.empty_like(out)
    if x2.shape[0]:
        _add_rms_norm_kernel[(x2.shape[0],)](x2, x2.stride(0), r2, r2.stride(0), weight, out, summed, n, eps,
                                             BLOCK=triton.next_power_of_2(n))
    return out.view(shape), summed.view(shape)


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, q_s0, q_s1, k_ptr, k_s0, k_s1, cs_ptr, cs_stride, qo_ptr, ko_ptr,
                   num_q_heads, num_k_heads, HALF: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < HALF
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos = tl.load(cs_ptr + pos * cs_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * cs_stride + HALF + cols, mask=mask, other=0.0).to(tl.float32)
    if h < num_q_heads:
        src = q_ptr + t * q_s0 + h * q_s1
        dst = qo_ptr + (t * num_q_heads + h) * (2 * HALF)
    else:
        hk = h - num_q_heads
        src = k_ptr + t * k_s0 + hk * k_s1
        dst = ko_ptr + (t * num_k_heads + hk) * (2 * HALF)
    x1 = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst + cols, (x1 * cos - x2 * sin).to(qo_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF + cols, (x2 * cos + x1 * sin).to(qo_ptr.dtype.element_ty), mask=mask)


def rotary(positions: Tensor, q: Tensor, k: Tensor, cos_sin: Tensor) -> tuple[Tensor, Tensor]:
    t, h, d = q.shape
    hk = k.shape[1]
    if q.stride(2) != 1:
        q = q.contiguous()
    if k.stride(2) != 1:
        k = k.contiguous()
    if cos_sin.stride(1) != 1:
        cos_sin = cos_sin.contiguous()
    assert q.dtype == k.dtype, "rotary: q and k must share a dtype"
    q_out = torch.empty((t, h, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, hk, d), dtype=k.dtype, device=k.device)
    if t:
        _rotary_kernel[(t, h + hk)](positions, q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1),
                                    cos_sin, cos_sin.stride(0), q_out, k_out, h, hk,
                                    HALF=d // 2, BLOCK=triton.next_power_of_2(d // 2))
    return q_out, k_out


@triton.jit
def _silu_and_mul_kernel(x_ptr, x_stride, out_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    # torch rounds silu(gate) to the dtype before the product; do the same
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: Tensor) -> Tensor:
    shape, n = x.shape, x.shape[-1] // 2
    x2 = _rows(x)
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = min(1024, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](x2, x2.stride(0), out, n, BLOCK=block)
    return out.view(*shape[:-1], n)
