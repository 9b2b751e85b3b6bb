"""Linear layers: the platform decides how weights are stored and multiplied.

Loaders hand the platform either a dense weight or a :class:`GroupQuantWeight`
(a format-neutral description of group-wise quantised weights, e.g. GGUF Q4_0,
Q4_1 and Q8_0); the platform returns a :class:`Linear`.
"""
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass
class GroupQuantWeight:
    """w[n, k] = q[n, k] * scale[n, k // group_size] + minimum[n, k // group_size].

    q holds unsigned integers in [0, 2**bits) as uint8; scale and minimum are float.
    """
    q: Tensor
    scale: Tensor
    minimum: Tensor
    group_size: int
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        n, k = self.q.shape
        groups = self.q.view(n, k // self.group_size, self.group_size).float()
        w = groups * self.scale.float().unsqueeze(-1) + self.minimum.float().unsqueeze(-1)
        return w.view(n, k).to(dtype)


class Linear(torch.nn.Module):
    """y = x @ W.T + b. Platforms subclass it for their weight formats."""

    out_features: int
    in_features: int


class ReferenceLinear(Linear):
    """Dense weights in the compute dtype; quantised weights are dequantised once, here."""

    def __init__(self, weight: "Tensor | GroupQuantWeight", bias: Tensor | None, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        super().__init__()
        if isinstance(weight, GroupQuantWeight):
            weight = weight.dequantize(torch.float32)
        self.weight = weight.to(device=device, dtype=dtype)
        self.bias = None if bias is None else bias.to(device=device, dtype=dtype)
        self.out_features, self.in_features = self.weight.shape

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)
