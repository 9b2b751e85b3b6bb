"""Ops tier: every op of ``platform.ops()`` and ``make_linear`` against the plugin API's references.

Inputs are rounded to the case dtype first; the reference then runs in float64 on those
rounded inputs, so the measured error is the platform's alone. Shapes include odd row
counts and a tiny-magnitude rms_norm input, where a missing or misplaced eps shows.
"""
import math

import torch

from plugserve_plugin_api import REFERENCE_OPS, GroupQuantWeight, PlatformConfig, ReferenceLinear
from plugserve_conformance.cases import Case, check
from plugserve_conformance.numerics import assert_close, dtype_name, tolerance

ROWS_FULL = (1, 7, 16, 17, 129)
ROWS_QUICK = (1, 17)
HIDDEN = (64, 1024)
EPS = 1e-6


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(t, dtype, *shapes, seed=0, scale=1.0):
    g = _gen(seed)
    return [(torch.randn(*s, generator=g) * scale).to(dtype).to(t.device) for s in shapes]


def _ref(fn, *args):
    """Run a reference op in float64 on the (already dtype-rounded) inputs."""
    return fn(*[a.double().cpu() if isinstance(a, torch.Tensor) else a for a in args])


def _unchanged(name, before, after):
    for i, (b, a) in enumerate(zip(before, after)):
        check(torch.equal(b, a.cpu()), f"{name} modified its input #{i} in place")


def _rms_norm(rows, hidden, dtype, scale):
    def run(t):
        x, w = _inputs(t, dtype, (rows, hidden), (hidden,), seed=rows + hidden, scale=scale)
        w = (1 + 0.1 * w.float()).to(dtype)
        before = [x.cpu().clone(), w.cpu().clone()]
        out = t.platform.ops().rms_norm(x, w, EPS)
        _unchanged("rms_norm", before, [x, w])
        return {"nmse": assert_close("rms_norm", out, _ref(REFERENCE_OPS.rms_norm, x, w, EPS),
                                     tolerance(dtype, "op"), dtype)}
    return run


def _add_rms_norm(rows, hidden, dtype):
    def run(t):
        x, r, w = _inputs(t, dtype, (rows, hidden), (rows, hidden), (hidden,), seed=7 + rows)
        before = [x.cpu().clone(), r.cpu().clone()]
        out = t.platform.ops().add_rms_norm(x, r, w, EPS)
        _unchanged("add_rms_norm", before, [x, r])
        check(isinstance(out, tuple) and len(out) == 2, "add_rms_norm must return (normed, summed)")
        ref_norm, ref_sum = _ref(REFERENCE_OPS.add_rms_norm, x, r, w, EPS)
        tol = tolerance(dtype, "op")
        return {"nmse": max(assert_close("add_rms_norm.normed", out[0], ref_norm, tol, dtype),
                            assert_close("add_rms_norm.summed", out[1], ref_sum, tol, dtype))}
    return run


def cos_sin_cache(max_pos: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """[max_pos, D] fp32: cos in the first D/2 columns, sin in the last, as ops.rotary documents."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float()


def _rotary(tokens, head_dim, dtype):
    def run(t):
        q, k = _inputs(t, dtype, (tokens, 8, head_dim), (tokens, 2, head_dim), seed=tokens + head_dim)
        max_pos = 4096
        positions = torch.randint(0, max_pos, (tokens,), generator=_gen(tokens))
        positions[0] = 0  # position 0 is the identity rotation
        positions = positions.to(t.device)
        cos_sin = cos_sin_cache(max_pos, head_dim).to(t.device)
        before = [q.cpu().clone(), k.cpu().clone()]
        out = t.platform.ops().rotary(positions, q, k, cos_sin)
        _unchanged("rotary", before, [q, k])
        ref_q, ref_k = REFERENCE_OPS.rotary(positions.cpu(), q.double().cpu(), k.double().cpu(), cos_sin.double().cpu())
        tol = tolerance(dtype, "op")
        return {"nmse": max(assert_close("rotary.q", out[0], ref_q, tol, dtype),
                            assert_close("rotary.k", out[1], ref_k, tol, dtype))}
    return run


def _silu_and_mul(rows, width, dtype):
    def run(t):
        (x,) = _inputs(t, dtype, (rows, 2 * width), seed=rows * 3 + width)
        out = t.platform.ops().silu_and_mul(x)
        return {"nmse": assert_close("silu_and_mul", out, _ref(REFERENCE_OPS.silu_and_mul, x),
                                     tolerance(dtype, "op"), dtype)}
    return run


def random_group_weight(n: int, k: int, group: int, bits: int, seed: int = 0) -> GroupQuantWeight:
    """Asymmetric groups, like GGUF Q4_1: a zero point that is not the middle of the range."""
    g = _gen(seed)
    q = torch.randint(0, 2 ** bits, (n, k), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, k // group, generator=g) + 0.5) * 0.02
    minimum = -(torch.rand(n, k // group, generator=g) + 0.5) * scale * 2 ** (bits - 1)
    return GroupQuantWeight(q, scale, minimum, group, bits)


def _linear(kind, rows, n, k, dtype, bias):
    def run(t):
        g = _gen(n + k + rows)
        if kind == "dense":
            weight = (torch.randn(n, k, generator=g) / math.sqrt(k)).to(dtype)
            tol_kind = "matmul"
        else:
            weight = random_group_weight(n, k, 32, int(kind[1:]), seed=n + k)
            tol_kind = "quant_matmul"
        b = (torch.randn(n, generator=g) * 0.1).to(dtype) if bias else None
        config = t.platform.validate_config(PlatformConfig(dtype=dtype, quantization="auto"))
        layer = t.platform.make_linear(weight, b, config, t.device)
        check(isinstance(layer, torch.nn.Module), f"make_linear returned {type(layer).__name__}, not a Linear")
        check((layer.out_features, layer.in_features) == (n, k),
              f"make_linear: (out, in) = ({layer.out_features}, {layer.in_features}), expected ({n}, {k})")
        x = torch.randn(rows, k, generator=g).to(dtype)
        out = layer(x.to(t.device))
        reference = ReferenceLinear(weight, b, torch.float64)
        return {"nmse": assert_close(f"linear[{kind}]", out, reference(x.double()), tolerance(dtype, tol_kind), dtype),
                "layer": type(layer).__name__}
    return run


def cases(target, sweep: str) -> list[Case]:
    out = []
    rows_set = ROWS_QUICK if sweep == "quick" else ROWS_FULL
    for dtype in target.cls.supported_dtypes:
        dt = dtype_name(dtype)
        for rows in rows_set:
            for hidden in HIDDEN:
                shape = f"{rows}x{hidden}"
                out.append(Case(f"ops/rms_norm/{shape}-{dt}", "ops", _rms_norm(rows, hidden, dtype, 1.0)))
                out.append(Case(f"ops/add_rms_norm/{shape}-{dt}", "ops", _add_rms_norm(rows, hidden, dtype)))
                out.append(Case(f"ops/silu_and_mul/{rows}x{hidden}-{dt}", "ops", _silu_and_mul(rows, hidden, dtype)))
            # tiny activations (mean square ~1e-8 << eps): the eps term dominates here and only here
            out.append(Case(f"ops/rms_norm/tiny-{rows}x64-{dt}", "ops", _rms_norm(rows, 64, dtype, 1e-4)))
            for head_dim in (64, 128):
                out.append(Case(f"ops/rotary/{rows}x8x{head_dim}-{dt}", "ops", _rotary(rows, head_dim, dtype)))
        for kind in ("dense", "q4", "q8"):
            for rows in (1, 17):
                for n, k in ((64, 256), (256, 512)):
                    bias = n == 256
                    name = f"ops/linear/{kind}-g32-{rows}x{k}x{n}{'-bias' if bias else ''}-{dt}"
                    if kind == "dense":
                        name = name.replace("-g32", "")
                    out.append(Case(name, "ops", _linear(kind, rows, n, k, dtype, bias)))
    return out
