"""Weight-only quantised matmuls from torch's own CPU kernels.

4-bit group weights stay packed (torch's int4 format, bf16 activations); torch
computes w = (q - 8) * scale + zero, so a group's ``minimum`` becomes
zero = minimum + 8 * scale, exact up to bf16 rounding of scale and zero.
"""
import torch

from plugserve_plugin_api import GroupQuantWeight, Linear

# torch's CPU int4 kernel needs K divisible by this and a group size among these.
_INT4_GROUP_SIZES = (32, 64, 128, 256)


def int4_supported(weight: GroupQuantWeight) -> bool:
    n, k = weight.shape
    return weight.bits == 4 and weight.group_size in _INT4_GROUP_SIZES and k % 32 == 0 and n % 8 == 0


class Int4Linear(Linear):
    def __init__(self, weight: GroupQuantWeight, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group_size = weight.group_size
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.q.to(torch.int32), 2)
        scale = weight.scale.float()
        zero = weight.minimum.float() + 8 * scale
        # [K / group, N, 2] as the kernel expects
        self.scales_and_zeros = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.bias = None if bias is None else bias.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, shape[-1]).to(torch.bfloat16), self.packed, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*shape[:-1], self.out_features)
