"""The conformance suite must be able to fail: each planted platform below has exactly one
realistic defect, and the suite must report a failure naming the case that exposes it.
The CPU platform (and a defect-free copy of the planted attention backend) must pass.

Runs the "quick" sweep, restricted per bug to the tier that should catch it, to stay fast.
"""
import dataclasses
import json
import xml.etree.ElementTree as ET

import pytest
import torch
import torch.nn.functional as F

from plugserve_conformance import report as report_mod
from plugserve_conformance import run
from plugserve_conformance.expectations import ExpectationsError, parse
from plugserve_conformance.matrix import render
from plugserve_conformance.target import resolve, visible_to_engine
from plugserve_cpu import CpuPlatform
from plugserve_cpu.linear import Int4Linear
from plugserve_plugin_api import REFERENCE_OPS, MemoryInfo, ReferenceAttention
from plugserve_plugin_api.quant import GroupQuantWeight


class LoopAttention(ReferenceAttention):
    """A plain per-sequence paged attention, written the way a first kernel port often is.

    Each knob, off by default, is one defect; the planted platforms turn on exactly one."""
    name = "loop"
    causal_offset = 0          # 1: each query also sees the next token
    write_slot_offset = 0      # 1: k/v land one cache slot late
    gqa_modulo = False         # query head h reads KV head h % Hkv instead of h // (H / Hkv)
    stable_softmax = True      # False: exp without subtracting the row max, in the compute dtype
    use_cached_prefix = True   # False: attends only this step's tokens
    clear_block_tail = False   # True: zero the rest of each sequence's last block after writing (masked, so
                               # outputs stay right; only the sentinel check sees it)

    def prepare(self, batch):
        return batch

    def forward(self, q, k, v, kv_cache, batch):
        s = self.spec
        flat = kv_cache.view(2, -1, s.num_kv_heads, s.head_dim)
        slots = batch.slot_mapping + self.write_slot_offset
        flat[0].index_copy_(0, slots, k.to(kv_cache.dtype))
        flat[1].index_copy_(0, slots, v.to(kv_cache.dtype))
        if self.clear_block_tail:
            for last in batch.slot_mapping[batch.query_start_loc[1:] - 1].tolist():
                flat[:, last + 1:(last // s.block_size + 1) * s.block_size] = 0
        heads = torch.arange(s.num_heads)
        kv_head = heads % s.num_kv_heads if self.gqa_modulo else heads // (s.num_heads // s.num_kv_heads)
        out = torch.empty_like(q)
        starts = batch.query_start_loc.tolist()
        for i, (qlen, ctx) in enumerate(zip(batch.query_lens_cpu, batch.seq_lens_cpu)):
            first = 0 if self.use_cached_prefix else ctx - qlen
            pos = torch.arange(first, ctx)
            key_slots = batch.block_tables[i, pos // s.block_size] * s.block_size + pos % s.block_size
            keys, values = flat[0][key_slots][:, kv_head].float(), flat[1][key_slots][:, kv_head].float()
            qi = q[starts[i]:starts[i + 1]].float()
            scores = torch.einsum("qhd,khd->hqk", qi, keys) * s.softmax_scale
            qpos = torch.arange(ctx - qlen, ctx)
            scores = scores.masked_fill(pos[None, :] > qpos[:, None] + self.causal_offset, float("-inf"))
            if self.stable_softmax:
                probs = scores.softmax(-1)
            else:
                e = scores.to(q.dtype).exp().float()
                probs = e / e.sum(-1, keepdim=True)
            out[starts[i]:starts[i + 1]] = torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)
        return out


def _loop_platform(name, **defect):
    backend = type(f"Loop_{name}", (LoopAttention,), dict(defect))
    return type(f"Platform_{name}", (CpuPlatform,), {"name": name, "attention_backends": lambda self: [backend]})


def _ops_platform(name, **ops):
    return type(f"Platform_{name}", (CpuPlatform,), {"name": name,
                                                     "ops": lambda self: dataclasses.replace(REFERENCE_OPS, **ops)})


def _rotary_interleaved(positions, q, k, cos_sin):
    """GPT-J layout (rotate adjacent pairs): right maths, wrong convention for Llama checkpoints."""
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)

    def apply(x):
        x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2).to(x.dtype)

    return apply(q), apply(k)


def _rms_norm_no_eps(x, weight, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True)) * weight.float()).to(x.dtype)


def _silu_swapped(x):
    up, gate = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class LyingMemoryPlatform(CpuPlatform):
    name = "bug-memory"

    def memory_info(self):
        m = super().memory_info()
        return MemoryInfo(total=m.total, free=m.total + 2**30, used=-(2**30))   # counts reclaimable swap as free


class _Int4WrongZero(Int4Linear):
    def __init__(self, weight: GroupQuantWeight, bias):
        # the kernel computes (q - 8) * scale + zero; using 7 is the classic signed/unsigned slip
        super().__init__(GroupQuantWeight(weight.q, weight.scale, weight.minimum - weight.scale, weight.group_size,
                                          weight.bits), bias)


class Int4WrongZeroPlatform(CpuPlatform):
    name = "bug-int4-zero"

    def make_linear(self, weight, bias, config, device):
        if isinstance(weight, GroupQuantWeight) and weight.bits == 4:
            return _Int4WrongZero(weight, bias)
        return super().make_linear(weight, bias, config, device)


# name -> (platform, tiers to run, id glob to run, a case id that must fail)
PLANTED = {
    "causal-off-by-one": (_loop_platform("bug-causal", causal_offset=1), "attention", "attention/prefill/*-fp32",
                          "attention/prefill/gqa1-hd64-bs16-len9-fp32"),
    "kv-slot-off-by-one": (_loop_platform("bug-kv-slot", write_slot_offset=1), "attention", "attention/decode/*-fp32",
                           "attention/decode/gqa4-hd64-bs16-ctx17-fp32"),
    "kv-block-tail-cleared": (_loop_platform("bug-kv-tail", clear_block_tail=True), "attention",
                              "attention/prefill/*-fp32", "attention/prefill/gqa1-hd64-bs16-len9-fp32"),
    "gqa-head-mapping": (_loop_platform("bug-gqa", gqa_modulo=True), "attention", "attention/prefill/*-fp32",
                         "attention/prefill/gqa4-hd64-bs16-len17-fp32"),
    "softmax-overflow": (_loop_platform("bug-softmax", stable_softmax=False), "attention", "*large-logits*",
                         "attention/large-logits/gqa4-hd64-bs16-len129-bf16"),
    "ignores-cached-prefix": (_loop_platform("bug-prefix", use_cached_prefix=False), "attention",
                              "attention/prefix/*-fp32", "attention/prefix/gqa1-hd64-bs16-len17-fp32"),
    "rotary-interleaved": (_ops_platform("bug-rotary", rotary=_rotary_interleaved), "ops", "*rotary*",
                           "ops/rotary/17x8x128-fp32"),
    "rms-norm-no-eps": (_ops_platform("bug-rms-eps", rms_norm=_rms_norm_no_eps), "ops", "*rms_norm*",
                        "ops/rms_norm/tiny-17x64-fp32"),
    "silu-swapped-halves": (_ops_platform("bug-silu", silu_and_mul=_silu_swapped), "ops", "*silu*",
                            "ops/silu_and_mul/17x64-bf16"),
    "memory-info-lies": (LyingMemoryPlatform, "api", None, "api/memory-info"),
    "int4-wrong-zero-point": (Int4WrongZeroPlatform, "ops", "*linear*", "ops/linear/q4-g32-17x512x256-bias-fp32"),
}


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_suite_catches_planted_bug(bug):
    platform, tier, pattern, must_fail = PLANTED[bug]
    report = run(platform, tiers=(tier,), pattern=pattern, sweep="quick")
    failed = {r.id for r in report.failed}
    assert must_fail in failed, f"{bug}: {must_fail} not among failures {sorted(failed)[:10]}"
    # the failure is named and explained, not a crash of the run
    assert all(r.error for r in report.failed)
    if bug.startswith("kv-"):   # the KV cache check, not just the output comparison, catches KV bugs
        assert any("KV cache" in r.error for r in report.failed), [r.error for r in report.failed]


class BlockMajorAttention(ReferenceAttention):
    """The reference kernel behind a different cache layout, [blocks, 2, block_size, kv_heads, head_dim]:
    the suite must check such a cache through its block axis, without knowing the layout."""
    name = "block-major"
    clear_block_tail = False

    def kv_cache_shape(self, num_blocks):
        s = self.spec
        return (num_blocks, 2, s.block_size, s.num_kv_heads, s.head_dim)

    def forward(self, q, k, v, kv_cache, metadata):
        ref = kv_cache.transpose(0, 1).contiguous()
        out = super().forward(q, k, v, ref, metadata)
        if self.clear_block_tail:
            flat = ref.view(2, -1, self.spec.num_kv_heads, self.spec.head_dim)
            last = int(metadata.slot_mapping[-1])
            flat[:, last + 1:(last // self.spec.block_size + 1) * self.spec.block_size] = 0
        kv_cache.copy_(ref.transpose(0, 1))
        return out


def test_kv_cache_check_works_for_other_layouts():
    ok = type("P", (CpuPlatform,), {"name": "block-major", "attention_backends": lambda self: [BlockMajorAttention]})
    report = run(ok, tiers=("attention",), pattern="attention/prefill/*len9-fp32", sweep="quick")
    assert report.ok and report.results, [(r.id, r.error) for r in report.failed]
    bad_backend = type("Bad", (BlockMajorAttention,), {"clear_block_tail": True})
    bad = type("P", (CpuPlatform,), {"name": "block-major-bad", "attention_backends": lambda self: [bad_backend]})
    report = run(bad, tiers=("attention",), pattern="attention/prefill/*len9-fp32", sweep="quick")
    assert report.failed and all("does not hold exactly its tokens" in r.error for r in report.failed)


def test_cpu_attention_passes_quick_sweep():
    report = run("cpu", tiers=("attention",), pattern="*gqa4*", sweep="quick")  # the full sweep: docs/conformance
    assert report.ok and len(report.results) > 20, [(r.id, r.error) for r in report.failed]


def test_defect_free_loop_backend_passes():
    """The planted backend without a defect passes, so each failure above is the defect's alone."""
    report = run(_loop_platform("loop-ok"), tiers=("attention",), pattern="*gqa4*-fp32", sweep="quick")
    assert report.ok, [(r.id, r.error) for r in report.failed]
    assert {"prefill", "decode", "prefix", "mixed", "large-logits"} <= {r.id.split("/")[1] for r in report.results}


def test_cpu_platform_passes_quick_suite():
    report = run("cpu", tiers=("api", "ops", "graph", "communicator"), sweep="quick")
    assert report.ok, [(r.id, r.error) for r in report.failed]
    counts = report.counts()
    assert counts["passed"] > 60 and counts["unsupported"] == 5   # graph + communicator: no capability yet
    assert all(r.reason == "no-capability" for r in report.results if r.status == "unsupported")


def test_e2e_tier_catches_a_bug_through_the_engine():
    """The planted platform is found by name by the engine through a temporary entry point."""
    report = run(PLANTED["rotary-interleaved"][0], tiers=("e2e",), pattern="*fp32")
    assert [r.id for r in report.failed] == ["e2e/greedy-tiny-llama-fp32"]
    assert "differ from the reference" in report.failed[0].error


def test_expectations_turn_failures_into_xfail_and_report_xpass():
    exp = parse({
        "expected-failure": [{"id": "ops/rms_norm/tiny-*", "reason": "known-bug"},
                             {"id": "ops/rms_norm/1x64-fp32", "reason": "numerical-tolerance"}],
        "exclude": [{"id": "ops/rms_norm/*-bf16", "reason": "unsupported-dtype", "note": "no bf16 kernel"}],
    })
    report = run(PLANTED["rms-norm-no-eps"][0], tiers=("ops",), pattern="ops/rms_norm/*", sweep="quick",
                 expectations=exp)
    by_id = {r.id: r for r in report.results}
    assert report.ok
    assert by_id["ops/rms_norm/tiny-17x64-fp32"].status == "xfail"
    assert by_id["ops/rms_norm/1x64-fp32"].status == "xpass"          # reported, does not fail the run
    assert by_id["ops/rms_norm/1x64-bf16"].status == "unsupported"
    assert by_id["ops/rms_norm/1x64-bf16"].reason == "unsupported-dtype"
    include = parse({"include": [{"id": "ops/silu*", "reason": "not-implemented"}]})
    assert {r.id.split("/")[1] for r in run("cpu", tiers=("ops",), sweep="quick", expectations=include).results} \
        == {"silu_and_mul"}


def test_expectations_require_a_known_reason():
    with pytest.raises(ExpectationsError, match="reason must be one of"):
        parse({"exclude": [{"id": "ops/*"}]})
    with pytest.raises(ExpectationsError, match="unknown sections"):
        parse({"xfail": []})


def test_unsupported_shapes_are_not_failures():
    class NoGqa3(LoopAttention):
        name = "no-gqa3"

        @classmethod
        def unsupported_reason(cls, spec):
            return "GQA ratio 3 not supported" if spec.num_heads // spec.num_kv_heads == 3 else None

    platform = type("P", (CpuPlatform,), {"name": "no-gqa3", "attention_backends": lambda self: [NoGqa3]})
    report = run(platform, tiers=("attention",), pattern="attention/decode/gqa3-hd64-bs16-ctx1-*")
    assert report.ok and {r.status for r in report.results} == {"unsupported"} and len(report.results) == 2


def test_reports_and_matrix(tmp_path):
    report = run(LyingMemoryPlatform, tiers=("api", "graph"))
    report_mod.write_json(report, tmp_path / "r.json")
    report_mod.write_junit(report, tmp_path / "r.xml")
    data = json.loads((tmp_path / "r.json").read_text())
    for key in ("platform", "package", "package_version", "api_version", "device", "suite_version"):
        assert data[key], key
    assert data["platform"] == "bug-memory" and data["counts"]["failed"] == 1
    assert {"id", "status", "seconds"} <= set(data["results"][0])
    suite = ET.parse(tmp_path / "r.xml").getroot()
    assert suite.get("failures") == "1"
    assert suite.find("testcase[@name='memory-info']/failure") is not None
    md = render([data])
    assert "| `api/memory-info` |" not in md and "| `api` |" in md and "❌" in md


def test_cli_exit_code_and_matrix(tmp_path, capsys):
    from plugserve.cli import main

    target = resolve(LyingMemoryPlatform)
    with visible_to_engine(target):    # the CLI takes names; publish the planted platform under its name
        assert main(["conformance", "--platform", "bug-memory", "--tier", "api", "--report", str(tmp_path / "b.json"),
                     "--junit", str(tmp_path / "b.xml")]) == 1
    assert "FAILED api/memory-info" in capsys.readouterr().out
    assert main(["conformance", "--platform", "cpu", "--tier", "api", "--report", str(tmp_path / "c.json")]) == 0
    assert main(["conformance", "matrix", str(tmp_path / "c.json"), str(tmp_path / "b.json"),
                 "-o", str(tmp_path / "m.md")]) == 0
    assert "| cpu | plugserve-cpu" in (tmp_path / "m.md").read_text()
