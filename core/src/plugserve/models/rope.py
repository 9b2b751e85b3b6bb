"""The rotary cos|sin table, with Hugging Face's rope scaling variants applied."""
import math

import torch

Tensor = torch.Tensor


def _inv_freq(theta: float, dim: int) -> Tensor:
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)


def _llama3(inv_freq: Tensor, s: dict) -> Tensor:
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between."""
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _angles(positions: Tensor, inv_freq: Tensor) -> Tensor:
    return positions.float().unsqueeze(-1) * inv_freq  # [P, D/2]


def _dynamic_angles(positions: Tensor, theta: float, dim: int, s: dict, max_pos: int) -> Tensor:
    """Dynamic NTK. Hugging Face rescales the base by the whole sequence's length; one static table cannot,
    so a position past the original length gets the base a sequence ending there would use. Within the
    original length this equals Hugging Face exactly (no scaling)."""
    old_len = s.get("original_max_position_embeddings", max_pos)
    angles = _angles(positions, _inv_freq(theta, dim))
    beyond = positions >= old_len
    if beyond.any():
        seq_len = positions[beyond].double() + 1
        base = theta * ((s["factor"] * seq_len / old_len) - (s["factor"] - 1)) ** (dim / (dim - 2))
        exps = torch.arange(0, dim, 2, dtype=torch.float64) / dim
        inv = 1.0 / base.unsqueeze(-1) ** exps
        angles[beyond] = (positions[beyond].double().unsqueeze(-1) * inv).float()
    return angles


def cos_sin_table(head_dim: int, max_pos: int, theta: float, scaling: dict | None) -> Tensor:
    """[max_pos, head_dim] fp32: cos in the first half of the columns, sin in the second."""
    positions = torch.arange(max_pos)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        angles = _angles(positions, _inv_freq(theta, head_dim))
    elif rope_type == "linear":
        angles = _angles(positions, _inv_freq(theta, head_dim) / scaling["factor"])
    elif rope_type == "llama3":
        angles = _angles(positions, _llama3(_inv_freq(theta, head_dim), scaling))
    elif rope_type == "dynamic":
        angles = _dynamic_angles(positions, theta, head_dim, scaling, max_pos)
    else:
        raise NotImplementedError(f"rope scaling type {rope_type!r} is not supported")
    return torch.cat((angles.cos(), angles.sin()), dim=-1)
