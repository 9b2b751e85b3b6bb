"""The engine end to end on the default model (SmolLM2-135M GGUF), on the CPU platform.

Reference: Hugging Face transformers loading the same GGUF (dequantised, fp32).
"""
import os

import pytest
import torch

from plugserve import LLM, SamplingParams
from plugserve.loader import default_model_path

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away,",
    "List three prime numbers: 2,",
    "Water boils at a temperature of",
    "The quick brown fox",
]
TIE_MARGIN = 1e-3  # a top-2 logit gap under this is a genuine tie: greedy may go either way


def make_llm(**overrides) -> LLM:
    args = dict(dtype="float32", quantization="none", debug_invariants=True, max_model_len=2048,
                kv_cache_memory=256 * 2**20)
    args.update(overrides)
    return LLM(platform="cpu", **args)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return make_llm()


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    model.generation_config.eos_token_id = None  # run the full length, as ignore_eos does on our side
    return model.eval()


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def assert_same_greedy(ours: list[int], ref: list[int], prompt_ids: list[int], hf_model) -> None:
    """Equal, or diverging only where transformers' own top-2 margin is a tie."""
    if ours == ref:
        return
    step = next(i for i, (a, b) in enumerate(zip(ours, ref)) if a != b)
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt_ids + ref[:step]])).logits[0, -1]
    top2 = logits.topk(2).values
    margin = float(top2[0] - top2[1])
    assert margin < TIE_MARGIN, f"diverged at step {step} with top-2 margin {margin:.4g}: {ours} vs {ref}"
    print(f"diverged at step {step} at a tie (margin {margin:.2g})")


def test_greedy_64_tokens_match_transformers(llm, hf_model):
    tok = llm.tokenizer
    prompts = PROMPTS[:5]
    outs = llm.generate(prompts, greedy(64))
    for prompt, out in zip(prompts, outs):
        ids = tok.encode(prompt)
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                                    pad_token_id=0)[0, len(ids):].tolist()
        assert_same_greedy(out.outputs[0].token_ids, ref, ids, hf_model)
        assert out.outputs[0].finish_reason == "length"


def _mixed_prompts(tok, count=32):
    """Mixed lengths, several sharing prefixes (so the prefix cache is exercised)."""
    base = PROMPTS * 6
    prompts = []
    for i in range(count):
        text = base[i % len(base)] + (" and then" * (i % 7)) + f" {i}"
        prompts.append(tok.encode(text))
    long = tok.encode("Tell me a long story about a dragon. " * 12)
    prompts[5] = long
    prompts[17] = long + tok.encode(" It ended well.")
    return prompts


@pytest.fixture(scope="module")
def alone_outputs(llm):
    prompts = _mixed_prompts(llm.tokenizer)
    return prompts, [llm.generate([p], greedy(12))[0].outputs[0].token_ids for p in prompts]


@pytest.mark.parametrize("variant", ["default", "no_prefix_cache", "small_chunks", "preemption"])
def test_batch_invariance(variant, llm, alone_outputs, hf_model):
    prompts, alone = alone_outputs
    engine_llm = {
        "default": lambda: llm,
        "no_prefix_cache": lambda: make_llm(enable_prefix_caching=False),
        "small_chunks": lambda: make_llm(max_num_batched_tokens=48, chunked_prefill_size=16),
        "preemption": lambda: make_llm(kv_cache_memory=40 * 16 * 30 * 2 * 3 * 64 * 4),  # 40 blocks of 16 tokens
    }[variant]()
    outs = engine_llm.generate(prompts, greedy(12))
    for p, out, ref in zip(prompts, outs, alone):
        assert_same_greedy(out.outputs[0].token_ids, ref, p, hf_model)
    stats = engine_llm.engine.stats()
    assert stats["num_running"] == 0 and stats["num_kv_blocks_used"] == 0
    if variant == "preemption":
        assert stats["num_preemptions"] > 0
    if variant == "default":
        assert stats["prefix_cache_hit_rate"] > 0


def test_seeded_sampling_is_reproducible_across_batch_compositions(llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(["Write a poem about the sea."], params)[0].outputs[0].token_ids
    noise = SamplingParams(temperature=1.0, max_tokens=20)
    batch = llm.generate(["Hi", "Write a poem about the sea.", "Count to ten:"], [noise, params, noise])
    assert batch[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, seed=99, max_tokens=16, ignore_eos=True)
    assert llm.generate(["Write a poem about the sea."], other_seed)[0].outputs[0].token_ids != alone


def test_n_completions_share_the_prompt_and_differ(llm):
    out = llm.generate(["Tell me a joke."], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    single = llm.generate(["Tell me a joke."], SamplingParams(temperature=1.0, seed=7, max_tokens=12))[0]
    assert single.outputs[0].token_ids == out.outputs[0].token_ids  # child 0 keeps the seed
    assert llm.engine.stats()["num_kv_blocks_used"] == 0


def test_stop_strings_stop_tokens_and_max_tokens(llm):
    free = llm.generate(["List three prime numbers: 2,"], greedy(20))[0].outputs[0]
    assert len(free.token_ids) == 20 and free.finish_reason == "length"
    stop = free.text.strip()[:3][-1]
    out = llm.generate(["List three prime numbers: 2,"], greedy(20, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and stop not in out.text
    assert free.text.startswith(out.text)
    tok_stop = llm.generate(["List three prime numbers: 2,"], greedy(20, stop_token_ids=[free.token_ids[2]]))[0]
    assert tok_stop.outputs[0].token_ids == free.token_ids[:3]


def test_chat_answers_sensibly(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=24))[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"


def test_logprobs_are_consistent_with_greedy_choice(llm):
    out = llm.generate(["The capital of France is"], greedy(5, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == 5
    for token, entry in zip(out.token_ids, out.logprobs):
        top = entry["top_logprobs"]
        assert len(top) == 3 and top[0][0] == token
        assert entry["logprob"] == pytest.approx(top[0][1]) and entry["logprob"] <= 0


def test_bad_requests_fail_clearly_and_leave_the_engine_working(llm):
    engine = llm.engine
    with pytest.raises(ValueError, match="maximum context length is 2048"):
        engine.add_request("too-long", [1] * 2000, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(ValueError, match="token ids must be in"):
        engine.add_request("oov", [10**9], SamplingParams())
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert not engine.has_unfinished_requests()
    assert llm.generate(["Hello"], greedy(3))[0].outputs[0].finish_reason == "length"


def test_abort_frees_blocks_at_once(llm):
    engine = llm.engine
    engine.add_request("a", "Tell me a long story about a dragon. " * 10, greedy(50))
    engine.add_request("b", "Count to ten:", greedy(50))
    engine.step()
    engine.step()
    assert engine.stats()["num_kv_blocks_used"] > 0
    engine.abort_request("a")
    engine.abort_request("b")
    assert engine.stats()["num_kv_blocks_used"] == 0 and not engine.has_unfinished_requests()
    assert engine.step() == []
