"""The CPU platform's ops, linears and attention against plain references."""
import math

import pytest
import torch

from plugserve_cpu import CpuPlatform
from plugserve_cpu.linear import Int4Linear
from plugserve_plugin_api import (
    AttentionBatch, AttentionSpec, ConfigError, GroupQuantWeight, PlatformConfig, ReferenceAttention, ReferenceLinear,
    ops,
)


def test_detection_and_device_queries():
    assert CpuPlatform.detect().usable
    platform = CpuPlatform()
    mem = platform.memory_info()
    assert 0 < mem.free <= mem.total and mem.used == mem.total - mem.free
    assert platform.init_device().type == "cpu"
    assert platform.describe_device()


def test_config_validation_fills_defaults_and_rejects_what_it_cannot_run():
    platform = CpuPlatform()
    cfg = platform.validate_config(PlatformConfig())
    assert cfg.dtype in (torch.float32, torch.bfloat16) and cfg.block_size == 16
    with pytest.raises(ConfigError, match="float16"):
        platform.validate_config(PlatformConfig(dtype=torch.float16))
    with pytest.raises(ConfigError, match="power of two"):
        platform.validate_config(PlatformConfig(dtype=torch.float32, block_size=12))


def _random_group_weight(n, k, group, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2 ** bits, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.rand(n, k // group, generator=g) * 0.02
    minimum = -torch.rand(n, k // group, generator=g) * 0.1
    return GroupQuantWeight(q, scale, minimum, group, bits)


@pytest.mark.parametrize("rows", [1, 7, 32])
def test_int4_linear_matches_dequantised_reference(rows):
    weight = _random_group_weight(256, 576, 32, 4)
    bias = torch.randn(256)
    x = torch.randn(rows, 576)
    ref = ReferenceLinear(weight, bias, torch.float32)(x)
    out = Int4Linear(weight, bias)(x)
    nmse = ((out - ref) ** 2).mean() / (ref ** 2).mean()
    assert nmse < 1e-4, nmse  # bf16 activations, scales and zeros: ~1e-5 expected


def test_platform_keeps_4bit_weights_packed_only_when_allowed():
    platform = CpuPlatform()
    weight = _random_group_weight(64, 128, 32, 4)
    auto = platform.validate_config(PlatformConfig(dtype=torch.float32))
    assert isinstance(platform.make_linear(weight, None, auto, torch.device("cpu")), Int4Linear)
    exact = auto.replace(quantization="none")
    assert isinstance(platform.make_linear(weight, None, exact, torch.device("cpu")), ReferenceLinear)


def test_reference_ops_semantics():
    x = torch.randn(5, 64)
    w = torch.randn(64)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), expected)
    res = torch.randn(5, 64)
    normed, summed = ops.add_rms_norm(x, res, w, 1e-5)
    torch.testing.assert_close(summed, x + res)
    torch.testing.assert_close(normed, ops.rms_norm(x + res, w, 1e-5))
    gate_up = torch.randn(3, 20)
    torch.testing.assert_close(ops.silu_and_mul(gate_up),
                               torch.nn.functional.silu(gate_up[:, :10]) * gate_up[:, 10:])


def test_rotary_preserves_norm_and_rotates_by_position():
    d, positions = 8, torch.tensor([0, 3])
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.outer(torch.arange(16).float(), inv)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)
    q, k = torch.randn(2, 2, d), torch.randn(2, 1, d)
    q2, k2 = ops.rotary(positions, q, k, cos_sin)
    torch.testing.assert_close(q2[0], q[0])  # position 0: identity
    torch.testing.assert_close(q2.norm(dim=-1), q.norm(dim=-1))
    # pair (0, d/2) of position 3 rotates by angle 3 * inv[0] = 3
    a, b = q[1, 0, 0], q[1, 0, d // 2]
    torch.testing.assert_close(q2[1, 0, 0], a * math.cos(3) - b * math.sin(3))


def _dense_attention(q, k, v, scale):
    """Causal attention over one whole sequence, no paging: [L, H, D] with GQA by repetition."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril(k.shape[0] - q.shape[0])
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)


def test_paged_reference_attention_matches_dense_for_mixed_batches():
    """Three sequences in one step: a decode, a fresh prefill, a prefill after a cached prefix."""
    spec = AttentionSpec(num_heads=6, num_kv_heads=2, head_dim=16, dtype=torch.float32, block_size=4)
    backend = ReferenceAttention(spec)
    cache = torch.zeros(backend.kv_cache_shape(32))
    torch.manual_seed(0)
    lengths, cached = [9, 7, 13], [8, 0, 5]  # context lengths and tokens already in the cache
    blocks = [[5, 2, 9], [0, 11], [3, 4, 7, 1]]
    full = [(torch.randn(n, 6, 16), torch.randn(n, 2, 16), torch.randn(n, 2, 16)) for n in lengths]
    slots = lambda i, pos: blocks[i][pos // 4] * 4 + pos % 4  # noqa: E731
    for i, (_, k, v) in enumerate(full):  # fill the cached prefixes
        for pos in range(cached[i]):
            cache[0].view(-1, 2, 16)[slots(i, pos)] = k[pos]
            cache[1].view(-1, 2, 16)[slots(i, pos)] = v[pos]
    qlens = [n - c for n, c in zip(lengths, cached)]
    q = torch.cat([f[0][c:] for f, c in zip(full, cached)])
    k = torch.cat([f[1][c:] for f, c in zip(full, cached)])
    v = torch.cat([f[2][c:] for f, c in zip(full, cached)])
    batch = AttentionBatch(
        query_start_loc=torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()]),
        seq_lens=torch.tensor(lengths),
        block_tables=torch.tensor([b + [0] * (4 - len(b)) for b in blocks]),
        slot_mapping=torch.tensor([slots(i, p) for i in range(3) for p in range(cached[i], lengths[i])]),
        query_lens_cpu=qlens, seq_lens_cpu=lengths)
    out = backend.forward(q, k, v, cache, backend.prepare(batch))
    expected = torch.cat([_dense_attention(*f, spec.softmax_scale)[c:] for f, c in zip(full, cached)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
