"""Perf tier: op and attention timings, reported and never judged (a slow kernel is not a wrong one)."""
import time

import torch

from plugserve_plugin_api import AttentionBatch, AttentionSpec, PlatformConfig
from plugserve_conformance.cases import Case, Unsupported
from plugserve_conformance.numerics import dtype_name
from plugserve_conformance.tiers.ops import cos_sin_cache

REPEATS = 20


def _time(t, fn) -> dict:
    fn()  # warm-up: first calls compile or allocate
    t.platform.synchronize()
    start = time.perf_counter()
    for _ in range(REPEATS):
        fn()
    t.platform.synchronize()
    return {"mean_us": round((time.perf_counter() - start) / REPEATS * 1e6, 2), "repeats": REPEATS}


def _op(name, tokens, hidden, dtype):
    def run(t):
        ops, dev = t.platform.ops(), t.device
        x = torch.randn(tokens, hidden, dtype=dtype, device=dev)
        w = torch.ones(hidden, dtype=dtype, device=dev)
        if name == "rms_norm":
            return _time(t, lambda: ops.rms_norm(x, w, 1e-6))
        if name == "silu_and_mul":
            return _time(t, lambda: ops.silu_and_mul(x))
        if name == "rotary":
            q = torch.randn(tokens, 32, 128, dtype=dtype, device=dev)
            k = torch.randn(tokens, 8, 128, dtype=dtype, device=dev)
            pos = torch.arange(tokens, device=dev)
            cs = cos_sin_cache(tokens, 128).to(dev)
            return _time(t, lambda: ops.rotary(pos, q, k, cs))
        config = t.platform.validate_config(PlatformConfig(dtype=dtype))
        layer = t.platform.make_linear(torch.randn(hidden, hidden, dtype=dtype), None, config, dev)
        return _time(t, lambda: layer(x))
    return run


def _decode(backend_cls, dtype, batch, ctx):
    def run(t):
        spec = AttentionSpec(32, 8, 128, dtype, 16)
        if backend_cls.unsupported_reason(spec):
            raise Unsupported(backend_cls.unsupported_reason(spec))
        dev, per_seq = t.device, -(-ctx // 16)
        backend = backend_cls(spec)
        cache = torch.zeros(backend.kv_cache_shape(batch * per_seq + 1), dtype=dtype, device=dev)
        tables = torch.arange(1, batch * per_seq + 1, device=dev).view(batch, per_seq)
        slots = tables[:, (ctx - 1) // 16] * 16 + (ctx - 1) % 16
        b = AttentionBatch(torch.arange(batch + 1, device=dev), torch.full((batch,), ctx, device=dev), tables, slots,
                           [1] * batch, [ctx] * batch)
        q = torch.randn(batch, 32, 128, dtype=dtype, device=dev)
        k = torch.randn(batch, 8, 128, dtype=dtype, device=dev)
        meta = backend.prepare(b)
        return _time(t, lambda: backend.forward(q, k, k, cache, meta))
    return run


def cases(target, sweep: str) -> list[Case]:
    out = []
    for dtype in target.cls.supported_dtypes:
        dt = dtype_name(dtype)
        for name in ("rms_norm", "silu_and_mul", "rotary", "linear"):
            out.append(Case(f"perf/{name}/64x2048-{dt}", "perf", _op(name, 64, 2048, dtype)))
        for backend_cls in target.backends:
            out.append(Case(f"perf/attention-{backend_cls.name}/decode-bs16-batch8-ctx1024-{dt}", "perf",
                            _decode(backend_cls, dtype, 8, 1024)))
    return out
