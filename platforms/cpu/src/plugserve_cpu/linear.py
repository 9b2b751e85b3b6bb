"""Weight-only quantised matmuls from torch's own CPU kernels.

4-bit group weights stay packed (torch's int4 format, bf16 activations); torch
computes w = (q - 8) * scale + zero, so a group's ``minimum`` becomes
zero = minimum + 8 * scale, exact up to bf16 rounding of scale and zero.
"""
import torch

from plugserve_plugin_api import GroupQuantWeight, Linear

# torch's CPU int4 kernel needs K divisible by this and a group size among these.
_INT4_GROUP_SIZES = (32, 64, 128, 256)
DENSE_MIN_ROWS = 16


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
        # Many rows (prefill, big decode batches): torch's int4 kernel re-dequantises per row block and loses
        # to a dense GEMM, so those go through an fp32 copy of the same (bf16-rounded) weights.
        sz = self.scales_and_zeros.float()
        n, k = weight.shape
        g = weight.q.view(n, k // self.group_size, self.group_size).float() - 8
        self.dense = (g * sz[..., 0].t().unsqueeze(-1) + sz[..., 1].t().unsqueeze(-1)).view(n, k).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if x.numel() // shape[-1] >= DENSE_MIN_ROWS:
            y = torch.nn.functional.linear(x.reshape(-1, shape[-1]).float(), self.dense)
            if self.bias is not None:
                y = y + self.bias.float()
            return y.to(x.dtype).view(*shape[:-1], self.out_features)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, shape[-1]).to(torch.bfloat16), self.packed, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


def int8_supported(weight: GroupQuantWeight) -> bool:
    return weight.bits == 8


class Int8Linear(Linear):
    """8-bit weights (e.g. GGUF Q8_0, the usual tied embedding / LM head) through torch's int8 weight-only kernel.

    The kernel takes one scale per output row, so the dequantised weight is requantised symmetrically per
    row: q = round(w / s), s = max|w| / 127. Relative error per weight is at most s / 2 (about 0.4% of the
    row's largest weight); activations run in bf16.
    """

    def __init__(self, weight: GroupQuantWeight, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.dequantize(torch.float32)
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
        self.q = torch.round(w / scale.unsqueeze(1)).clamp_(-127, 127).to(torch.int8).contiguous()
        self.scales = scale.to(torch.bfloat16)
        self.bias = None if bias is None else bias.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.q, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*shape[:-1], self.out_features)
