"""Times TritonPagedAttention against ReferenceAttention (reported, not judged)."""
import sys
import time

import torch

sys.path.insert(0, "tests")
from test_cuda_platform import make_batch  # noqa: E402

from plugserve_cuda.attention import TritonPagedAttention  # noqa: E402
from plugserve_plugin_api import AttentionSpec, ReferenceAttention  # noqa: E402


def bench(fn, iters=20):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def main():
    dtype = torch.bfloat16
    for name, cases, (h, hk, d) in [
        ("decode 32 x ctx 5000, 32q/8kv heads, d128", [(1, 5000)] * 32, (32, 8, 128)),
        ("decode 64 x ctx 1000, 9q/3kv, d64", [(1, 1000)] * 64, (9, 3, 64)),
        ("prefill 4 x 2048, 32q/8kv, d128", [(2048, 2048)] * 4, (32, 8, 128)),
    ]:
        spec = AttentionSpec(h, hk, d, dtype, 16)
        nb = sum(-(-s // 16) for _, s in cases) + 8
        batch = make_batch(cases, 16, nb, "cuda")
        t = sum(q for q, _ in cases)
        q = torch.randn(t, h, d, device="cuda", dtype=dtype)
        k = torch.randn(t, hk, d, device="cuda", dtype=dtype)
        v = torch.randn(t, hk, d, device="cuda", dtype=dtype)
        times = []
        for cls in (TritonPagedAttention, ReferenceAttention):
            backend = cls(spec)
            cache = torch.randn(backend.kv_cache_shape(nb), device="cuda", dtype=dtype)
            meta = backend.prepare(batch)
            times.append(bench(lambda: backend.forward(q, k, v, cache, meta)))
        print(f"{name}: triton {times[0]:.3f} ms, reference {times[1]:.3f} ms")


if __name__ == "__main__":
    main()
