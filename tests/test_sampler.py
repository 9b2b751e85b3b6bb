"""Each sampling parameter must change the output exactly as its definition says."""
from __future__ import annotations

import math

import pytest
import torch

from plugserve.sampler import SampledToken, Sampler, SamplerRow
from plugserve.sampling_params import SamplingParams

V = 8
EOS = 7


def row(params=None, prompt=(), output=(), seed=None, **kw) -> SamplerRow:
    p = params or SamplingParams(**kw)
    g = None
    s = seed if seed is not None else p.seed
    if s is not None:
        g = torch.Generator().manual_seed(s)
    return SamplerRow(p, g, list(prompt), list(output))


def sample(logits, rows, eos=(EOS,)) -> list[SampledToken]:
    return Sampler(eos)(torch.as_tensor(logits, dtype=torch.float32), rows)


def draws(logits_row, n=4000, **kw) -> torch.Tensor:
    """Token counts over n draws of the same row (batched as n rows)."""
    logits = torch.as_tensor(logits_row, dtype=torch.float32).expand(n, -1)
    p = SamplingParams(**kw)
    ids = [t.token_id for t in Sampler([])(logits, [row(p) for _ in range(n)])]
    return torch.bincount(torch.tensor(ids), minlength=logits.shape[1])


LOGITS = [1.0, 3.0, 2.5, 0.5, -1.0, 2.0, 0.0, -2.0]


@pytest.fixture(autouse=True)
def _fixed_global_rng():
    # Statistical tests use the global RNG; fix it so they cannot flake.
    torch.manual_seed(12345)


# -- SamplingParams validation ----------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("n", 0), ("n", 129), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -2), ("min_p", 1.5), ("presence_penalty", 2.5),
    ("frequency_penalty", -3), ("repetition_penalty", 0.0), ("max_tokens", 0),
    ("min_tokens", -1), ("logprobs", 21), ("logprobs", -1), ("seed", 1.5),
    ("stop", [""]), ("stop_token_ids", [-1]),
])
def test_params_reject_out_of_range_naming_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_params_normalisation_and_children():
    p = SamplingParams(stop="###", top_k=-1, max_tokens=None, n=3, seed=10)
    assert p.stop == ["###"] and p.top_k == 0 and p.max_tokens is None
    kids = [p.clone_for_child(i) for i in range(3)]
    assert [k.seed for k in kids] == [10, 11, 12] and all(k.n == 1 for k in kids)
    assert SamplingParams(n=2).clone_for_child(1).seed is None
    with pytest.raises(ValueError):
        p.clone_for_child(3)


# -- greedy / temperature -----------------------------------------------------

def test_temperature_zero_is_argmax_with_lowest_id_tie():
    logits = torch.randn(32, 50)
    logits[0, 3] = logits[0, 9] = 100.0  # tie -> lowest id
    out = sample(logits, [row(temperature=0) for _ in range(32)])
    expected = logits.argmax(-1).tolist()
    assert [t.token_id for t in out] == expected and expected[0] == 3


def test_low_and_high_temperature():
    cold = draws(LOGITS, temperature=0.01)  # runner-up odds e^-50
    assert cold[1] == cold.sum()  # all mass on the argmax
    hot = draws(LOGITS, temperature=100.0)
    assert (hot > 0).all()  # near-uniform: every token shows up
    assert hot.max() < 2 * hot.min()


def test_distribution_matches_softmax_over_temperature():
    n, T = 20000, 0.7
    counts = draws(LOGITS, n=n, temperature=T).double()
    expected = torch.softmax(torch.tensor(LOGITS, dtype=torch.float64) / T, -1) * n
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    # 7 degrees of freedom: P(chi2 > 30) ~ 1e-4.
    assert chi2 < 30, (counts, expected)


# -- truncation -----------------------------------------------------------------

def test_top_k_one_is_greedy():
    logits = torch.randn(16, 40)
    out = sample(logits, [row(top_k=1) for _ in range(16)])
    assert [t.token_id for t in out] == logits.argmax(-1).tolist()


def test_top_k_limits_support():
    counts = draws(LOGITS, temperature=5.0, top_k=3)
    assert set(torch.nonzero(counts).flatten().tolist()) == {1, 2, 5}


def test_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([0.05, 0.4, 0.3, 0.2, 0.05]))
    # 0.4 + 0.3 = 0.7 < 0.75, so the nucleus must also include 0.2.
    counts = draws(logits, top_p=0.75)
    assert set(torch.nonzero(counts).flatten().tolist()) == {1, 2, 3}
    # Exactly reaching top_p stops the nucleus.
    counts = draws(logits, top_p=0.7)
    assert set(torch.nonzero(counts).flatten().tolist()) == {1, 2}
    # Tiny top_p still keeps the single most likely token.
    counts = draws(logits, n=200, top_p=1e-6)
    assert set(torch.nonzero(counts).flatten().tolist()) == {1}


def test_min_p_drops_tokens_below_fraction_of_max():
    logits = torch.log(torch.tensor([0.05, 0.4, 0.3, 0.15, 0.1]))
    # threshold 0.3 * 0.4 = 0.12: keep 0.4, 0.3, 0.15.
    counts = draws(logits, min_p=0.3)
    assert set(torch.nonzero(counts).flatten().tolist()) == {1, 2, 3}


# -- penalties ----------------------------------------------------------------------

def test_presence_and_frequency_penalties_exact():
    logits = torch.tensor([LOGITS])
    output = [2, 2, 2, 5]
    p = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25, logprobs=0)
    processed = Sampler([])._apply_penalties(logits, [row(p, prompt=[1], output=output)])
    expected = logits.clone()
    expected[0, 2] -= 3 * 0.25 + 0.5
    expected[0, 5] -= 1 * 0.25 + 0.5  # prompt token 1 is NOT penalised
    torch.testing.assert_close(processed, expected)
    assert torch.equal(logits, torch.tensor([LOGITS]))  # input untouched


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([LOGITS])
    p = SamplingParams(repetition_penalty=2.0)
    processed = Sampler([])._apply_penalties(logits, [row(p, prompt=[1, 4], output=[1, 6])])
    expected = logits.clone()
    expected[0, 1] = 3.0 / 2      # positive, counted once despite repeats
    expected[0, 4] = -1.0 * 2     # negative
    expected[0, 6] = 0.0          # zero stays zero
    torch.testing.assert_close(processed, expected)


def test_penalties_change_greedy_choice():
    # Token 1 is the argmax; a frequency penalty after 2 repeats demotes it.
    out = sample([LOGITS], [row(temperature=0, frequency_penalty=1.0, output=[1, 1])])
    assert out[0].token_id == 2


def test_penalised_and_plain_rows_in_one_batch():
    logits = torch.tensor([LOGITS, LOGITS])
    out = sample(logits, [row(temperature=0, presence_penalty=2.0, output=[1]),
                          row(temperature=0, output=[1])])
    assert [t.token_id for t in out] == [2, 1]


# -- min_tokens ---------------------------------------------------------------------

def test_min_tokens_blocks_eos_and_stop_ids():
    logits = torch.full((1, V), -5.0)
    logits[0, EOS] = 10.0
    logits[0, 3] = 9.0
    logits[0, 0] = 8.0
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3])
    assert sample(logits, [row(p, output=[5])])[0].token_id == 0
    assert sample(logits, [row(p, output=[5, 5])])[0].token_id == EOS  # reached


def test_min_tokens_respects_ignore_eos():
    logits = torch.full((1, V), -5.0)
    logits[0, EOS] = 10.0
    p = SamplingParams(temperature=0, min_tokens=2, ignore_eos=True)
    assert sample(logits, [row(p)])[0].token_id == EOS


# -- logprobs ----------------------------------------------------------------------

def test_logprobs_equal_log_softmax_and_topn_sorted():
    torch.manual_seed(0)
    logits = torch.randn(3, 30)
    rows = [row(temperature=0, logprobs=5), row(temperature=0.8, logprobs=0, seed=1),
            row(temperature=0)]
    out = sample(logits, rows, eos=())
    ref = torch.log_softmax(logits, -1)
    for i in (0, 1):
        assert math.isclose(out[i].logprob, ref[i, out[i].token_id].item(), abs_tol=1e-5)
    top = out[0].top_logprobs
    assert [t for t, _ in top] == ref[0].topk(5).indices.tolist()
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    for t, lp in top:
        assert math.isclose(lp, ref[0, t].item(), abs_tol=1e-5)
    assert out[1].top_logprobs == []
    assert out[2].logprob is None and out[2].top_logprobs is None


def test_logprobs_are_after_penalties_before_temperature():
    logits = torch.tensor([LOGITS])
    p = SamplingParams(temperature=0.3, top_k=2, frequency_penalty=1.0, logprobs=3, seed=0)
    out = sample(logits, [row(p, output=[1])], eos=())[0]
    penalised = logits.clone()
    penalised[0, 1] -= 1.0
    ref = torch.log_softmax(penalised, -1)[0]
    assert math.isclose(out.logprob, ref[out.token_id].item(), abs_tol=1e-5)
    assert [t for t, _ in out.top_logprobs] == ref.topk(3).indices.tolist()


# -- seeding -------------------------------------------------------------------------

def test_seeded_sampling_independent_of_batch_composition_and_position():
    torch.manual_seed(0)
    target = torch.randn(100)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)

    def run(batch_size, position, steps=20):
        gen = torch.Generator().manual_seed(1234)
        toks = []
        for _ in range(steps):
            logits = torch.randn(batch_size, 100)  # unrelated rows, global RNG
            logits[position] = target
            rows = [row(temperature=1.5, top_k=5) for _ in range(batch_size)]
            rows[position] = SamplerRow(p, gen, [], list(toks))
            toks.append(Sampler([])(logits, rows)[position].token_id)
        return toks

    alone = run(1, 0)
    assert run(7, 3) == alone and run(32, 31) == alone
    assert len(set(alone)) > 1  # it really is sampling


def test_different_seeds_differ():
    logits = torch.zeros(1, 1000)
    a = sample(logits, [row(seed=1)])[0].token_id
    b = sample(logits, [row(seed=2)])[0].token_id
    c = sample(logits, [row(seed=1)])[0].token_id
    assert a == c and a != b


def test_greedy_fast_path_is_one_argmax(monkeypatch):
    logits = torch.randn(32, 64)
    calls = []
    orig = torch.Tensor.argmax
    monkeypatch.setattr(torch.Tensor, "argmax", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    monkeypatch.setattr(torch.Tensor, "sort", lambda *a, **k: pytest.fail("no sort on greedy path"))
    out = sample(logits, [row(temperature=0) for _ in range(32)])
    assert len(calls) == 1 and len(out) == 32


def test_batch_shape_mismatch_rejected():
    with pytest.raises(ValueError):
        sample(torch.zeros(2, V), [row()])
