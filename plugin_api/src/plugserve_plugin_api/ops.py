"""The op table: every op a platform may accelerate, with its plain-torch reference.

The references define the semantics (conformance compares against them) and are the
fallback: a platform overrides only what it has a faster kernel for, with
``dataclasses.replace(REFERENCE_OPS, rms_norm=my_rms_norm)``.
"""
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dimension, computed in fp32, returned in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Return (rms_norm(x + residual), x + residual): the residual add fused with the next norm."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def rotary(positions: Tensor, q: Tensor, k: Tensor, cos_sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary embedding, "neox" layout (rotate halves), as Hugging Face Llama applies it.

    positions: [T] int; q: [T, H, D]; k: [T, Hkv, D]; cos_sin: [max_pos, D] fp32 holding
    cos in the first D/2 columns and sin in the last D/2. Returns new tensors.
    """
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)

    def apply(x: Tensor) -> Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return apply(q), apply(k)


def silu_and_mul(x: Tensor) -> Tensor:
    """SwiGLU activation: x is [..., 2F] = [gate | up]; returns silu(gate) * up, [..., F]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@dataclass(frozen=True)
class Ops:
    rms_norm: Callable[[Tensor, Tensor, float], Tensor] = rms_norm
    add_rms_norm: Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]] = add_rms_norm
    rotary: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]] = rotary
    silu_and_mul: Callable[[Tensor], Tensor] = silu_and_mul


REFERENCE_OPS = Ops()
