"""The CUDA platform: detection everywhere; kernels, attention and the engine end to end on a GPU.

CI has no GPU: everything but the detection tests skips there.
"""
import random

import pytest
import torch

from plugserve_cuda import CudaPlatform
from plugserve_plugin_api import AttentionBatch, AttentionSpec, PlatformConfig, ReferenceAttention, ops

HAS_CUDA = CudaPlatform.detect().usable
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def test_detection_answers_without_initialising_the_device():
    det = CudaPlatform.detect()
    assert det.priority == 100 and det.reason
    assert not torch.cuda.is_initialized()
    if torch.version.cuda is None or torch.version.hip:
        assert not det.usable


def test_detection_refuses_rocm_builds(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2")
    det = CudaPlatform.detect()
    assert not det.usable and "ROCm" in det.reason


def test_detection_refuses_cpu_builds(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.version, "cuda", None)
    det = CudaPlatform.detect()
    assert not det.usable and "not a CUDA build" in det.reason


def test_detection_refuses_when_no_device(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    det = CudaPlatform.detect()
    assert not det.usable and "no CUDA device" in det.reason


def test_registry_lists_cuda_with_its_reason():
    from plugserve.platforms import load_registry
    info = load_registry().platforms["cuda"]
    assert info.package and (info.usable or info.why_unusable)


# ------------------------------------------------------------------ GPU tests below
def nmse(out, ref):
    out, ref = out.float(), ref.float()
    return float(((out - ref) ** 2).mean() / (ref ** 2).mean().clamp_min(1e-30))


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-10, torch.bfloat16: 1e-4, torch.float16: 1e-6}


@pytest.fixture(scope="module")
def cuda_ops():
    pytest.importorskip("triton")
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    platform = CudaPlatform()
    platform.init_device(0)
    return platform.ops()


@gpu
def test_device_queries():
    platform = CudaPlatform()
    assert platform.init_device(0).type == "cuda"
    assert "sm_" in platform.describe_device()
    mem = platform.memory_info()
    assert 0 < mem.free <= mem.total and mem.used == mem.total - mem.free
    cfg = platform.validate_config(PlatformConfig())
    assert cfg.dtype == torch.bfloat16 and cfg.block_size == 16


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 576), (37, 576), (5, 9, 64), (300, 4096)])
def test_norms(cuda_ops, dtype, shape):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", generator=g).to(dtype)
    r = torch.randn(shape, device="cuda", generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], device="cuda", generator=g)).to(dtype)
    assert nmse(cuda_ops.rms_norm(x, w, 1e-5), ops.rms_norm(x, w, 1e-5)) < TOL[dtype]
    out, summed = cuda_ops.add_rms_norm(x, r, w, 1e-5)
    ref_out, ref_summed = ops.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(summed, ref_summed)
    assert nmse(out, ref_out) < TOL[dtype]


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (32, 8, 128)])
def test_rotary_on_strided_views(cuda_ops, dtype, heads, kv_heads, dim):
    t = 29
    qkv = torch.randn(t, (heads + 2 * kv_heads) * dim, device="cuda").to(dtype)
    q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    q, k = q.view(t, heads, dim), k.view(t, kv_heads, dim)
    pos = torch.randint(0, 4000, (t,), device="cuda")
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, device="cuda").float() / dim))
    freqs = torch.outer(torch.arange(4096, device="cuda").float(), inv)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)
    qo, ko = cuda_ops.rotary(pos, q, k, cos_sin)
    qr, kr = ops.rotary(pos, q, k, cos_sin)
    assert nmse(qo, qr) < TOL[dtype] and nmse(ko, kr) < TOL[dtype]


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(cuda_ops, dtype):
    x = torch.randn(33, 2 * 1536, device="cuda").to(dtype)
    assert nmse(cuda_ops.silu_and_mul(x), ops.silu_and_mul(x)) < TOL[dtype]
    x3 = torch.randn(2, 3, 2 * 100, device="cuda").to(dtype)
    assert nmse(cuda_ops.silu_and_mul(x3), ops.silu_and_mul(x3)) < TOL[dtype]


# ------------------------------------------------------------------ attention
def make_batch(cases, block_size, num_blocks, device, seed=0):
    """cases: (query_len, seq_len) per sequence; blocks are assigned at random (no sharing)."""
    rng = random.Random(seed)
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    starts, tables, slots = [0], [], []
    for qlen, slen in cases:
        n = -(-slen // block_size)
        table = [free.pop() for _ in range(n)]
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(slen - qlen, slen)]
        starts.append(starts[-1] + qlen)
    width = max(len(t) for t in tables)
    as_t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return AttentionBatch(as_t(starts), as_t([s for _, s in cases]), as_t([t + [0] * (width - len(t)) for t in tables]),
                          as_t(slots), [q for q, _ in cases], [s for _, s in cases])


ATTN_CASES = {
    "prefill": [(17, 17), (64, 64), (5, 5), (130, 130)],
    "decode": [(1, 1), (1, 33), (1, 600), (1, 1025)],
    "mixed": [(1, 40), (23, 23), (1, 7), (70, 70), (1, 513)],
    "prefix_hit": [(9, 41), (1, 200), (100, 356), (3, 1000), (48, 48)],
    "long": [(1, 5000), (1, 4097), (300, 5000), (1, 3)],
}


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (12, 3)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", list(ATTN_CASES))
@pytest.mark.parametrize("block_size", [16])
def test_attention_matches_reference(dtype, heads, kv_heads, head_dim, case, block_size):
    pytest.importorskip("triton")
    from plugserve_cuda.attention import TritonPagedAttention
    spec = AttentionSpec(heads, kv_heads, head_dim, dtype, block_size)
    assert TritonPagedAttention.unsupported_reason(spec) is None
    cases = ATTN_CASES[case]
    num_blocks = sum(-(-s // block_size) for _, s in cases) + 8
    batch = make_batch(cases, block_size, num_blocks, "cuda")
    ours, ref = TritonPagedAttention(spec), ReferenceAttention(spec)
    g = torch.Generator(device="cuda").manual_seed(1)
    cache = torch.randn(ours.kv_cache_shape(num_blocks), device="cuda", generator=g).to(dtype)  # cached prefixes
    cache_ref = cache.clone()
    t = sum(q for q, _ in cases)
    q = torch.randn(t, heads, head_dim, device="cuda", generator=g).to(dtype)
    k = torch.randn(t, kv_heads, head_dim, device="cuda", generator=g).to(dtype)
    v = torch.randn(t, kv_heads, head_dim, device="cuda", generator=g).to(dtype)
    out = ours.forward(q, k, v, cache, ours.prepare(batch))
    expected = ref.forward(q, k, v, cache_ref, ref.prepare(batch))
    assert torch.equal(cache, cache_ref), "KV write differs"
    err = nmse(out, expected)
    assert err < (1e-9 if dtype == torch.float32 else 5e-4), err


@gpu
def test_backend_rejects_what_it_cannot_run():
    pytest.importorskip("triton")
    from plugserve_cuda.attention import TritonPagedAttention
    assert "head dim" in TritonPagedAttention.unsupported_reason(AttentionSpec(8, 8, 80, torch.bfloat16, 16))
    assert "multiple" in TritonPagedAttention.unsupported_reason(AttentionSpec(9, 2, 64, torch.bfloat16, 16))


# ------------------------------------------------------------------ engine end to end
SMOLLM2_SHAPED = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "num_hidden_layers": 8, "num_attention_heads": 9,
    "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152, "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": 2,
}


def _greedy_tokens(platform, dtype, prompt_batches, max_tokens):
    """Each batch runs after the previous one, so later batches hit the prefix cache."""
    from plugserve import LLM, SamplingParams
    llm = LLM(platform=platform, load_format="dummy", dummy_config=SMOLLM2_SHAPED, dtype=dtype,
              max_model_len=2048, kv_cache_memory=512 * 2**20, debug_invariants=True)
    name = llm.engine.attention_backend.name
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    tokens = []
    for prompts in prompt_batches:
        tokens += [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
    return name, tokens


@gpu
@pytest.mark.slow
def test_engine_greedy_fp32_equals_cpu():
    pytest.importorskip("triton")
    rng = random.Random(0)
    shared = [rng.randrange(49152) for _ in range(40)]  # a common prefix: prefix-cache hits
    first = [[rng.randrange(49152) for _ in range(n)] for n in (5, 17, 64, 200, 700)] + [shared + [7, 8, 9]]
    second = [shared + [10, 11], shared + [12] * 30, first[3] + [5, 6]]
    prompts = [first, second]
    backend, cuda_tokens = _greedy_tokens("cuda", "float32", prompts, 24)
    assert backend == "triton_paged"
    _, cpu_tokens = _greedy_tokens("cpu", "float32", prompts, 24)
    for i, (a, b) in enumerate(zip(cuda_tokens, cpu_tokens)):
        assert a == b, f"prompt {i}: cuda {a} vs cpu {b}"


@gpu
@pytest.mark.slow
def test_engine_runs_bf16():
    pytest.importorskip("triton")
    backend, tokens = _greedy_tokens("cuda", "bfloat16", [[[1, 2, 3, 4, 5], list(range(100, 400))]], 16)
    assert backend == "triton_paged" and all(len(t) == 16 for t in tokens)
