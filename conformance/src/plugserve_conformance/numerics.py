"""Error measures and tolerances, after ggml's test-backend-ops.

NMSE = sum((out - ref)^2) / sum(ref^2), with the reference computed in float64 from
the same (dtype-rounded) inputs the platform got. NaN or Inf in an output is always a
failure, whatever the tolerance.
"""
import torch

from plugserve_conformance.cases import CaseFailure

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Per dtype, per kind of computation. The reasons, so a vendor knows what a loosening means:
# - fp32 elementwise ops: ggml's default 1e-7. A correct kernel differs from the reference only
#   by fp32 rounding (~1e-14 NMSE); 1e-7 leaves room for reordered reductions and fast rsqrt/exp.
# - fp32 matmul / attention: ggml uses 5e-4 (it feeds fp16 weights); with fp32 throughout,
#   a correct kernel lands near 1e-12, so 1e-6 allows TF32-free reductions in any order.
#   Platforms that use TF32 by default must list the cases as numerical-tolerance xfails.
# - bf16 (8-bit mantissa, relative rounding 2^-9): rounding the output alone gives
#   NMSE ~ 1e-6, an fp32-accumulated dot product of bf16 inputs ~1e-5; 1e-4 for ops, 5e-4
#   (ggml's matmul value) for matmul and attention.
# - fp16 (11-bit mantissa, 8x finer than bf16, but a narrow exponent range): 1e-5 / 1e-4.
# - quantised linears: the platform may compute with bf16 activations (torch's int4 CPU
#   kernel does) and bf16-rounded scales; the reference dequantises in fp32. 5e-4 as matmul.
TOLERANCES = {
    torch.float32: {"op": 1e-7, "matmul": 1e-6, "attention": 1e-6, "quant_matmul": 5e-4},
    torch.bfloat16: {"op": 1e-4, "matmul": 5e-4, "attention": 5e-4, "quant_matmul": 5e-4},
    torch.float16: {"op": 1e-5, "matmul": 1e-4, "attention": 1e-4, "quant_matmul": 5e-4},
}
# Whole-model end-to-end logprobs in bf16: ~2e-3 NMSE per layer in ggml's terms; on a logprob,
# a 2-layer model lands well under 0.05 nats when correct and far over it when a kernel is wrong.
E2E_BF16_LOGPROB_TOL = 0.05


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def tolerance(dtype: torch.dtype, kind: str) -> float:
    return TOLERANCES.get(dtype, TOLERANCES[torch.bfloat16])[kind]


def nmse(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    denom = ref.pow(2).sum().item()
    err = (out - ref).pow(2).sum().item()
    return err / denom if denom > 0 else err


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float,
                 dtype: torch.dtype | None = None) -> float:
    """Fail unless ``out`` has ref's shape (and ``dtype`` if given), is finite, and NMSE <= tol; return the NMSE."""
    if not isinstance(out, torch.Tensor):
        raise CaseFailure(f"{name}: expected a tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(ref.shape):
        raise CaseFailure(f"{name}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
    if dtype is not None and out.dtype != dtype:
        raise CaseFailure(f"{name}: dtype {out.dtype}, expected {dtype}")
    out = out.detach().cpu()
    bad = (~torch.isfinite(out)).sum().item()
    if bad:
        raise CaseFailure(f"{name}: {bad} of {out.numel()} values are NaN or Inf")
    err = nmse(out, ref.cpu())
    if not err <= tol:
        raise CaseFailure(f"{name}: NMSE {err:.3g} > tolerance {tol:.0e}")
    return err
