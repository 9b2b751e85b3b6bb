"""End-to-end tier: the engine on the platform under test against the CPU reference platform,
on a fixed-seed random Llama built with load_format="dummy".

fp32: greedy tokens must be identical. bf16: token choices may differ at near-ties, so the
check is on logprobs: wherever the reference chose a token, the platform's logprob for that
token (from its top-k list) must be within E2E_BF16_LOGPROB_TOL; comparison stops at the first
step where the platform chose differently, since later contexts differ.
"""
import gc

import torch

from plugserve_conformance.cases import Case, Unsupported, check
from plugserve_conformance.numerics import E2E_BF16_LOGPROB_TOL, dtype_name
from plugserve_conformance.target import visible_to_engine

REFERENCE_PLATFORM = "cpu"
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
    "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
}
MAX_TOKENS = 12
TOP_K = 5


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    shared = torch.randint(0, 512, (40,), generator=g).tolist()
    lens = (1, 7, 17, 129)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in lens]
    # two prompts sharing a 40-token prefix: the second hits the prefix cache
    return prompts + [shared + [1, 2, 3], shared + [4, 5]]


def _generate(platform_name: str, dtype: str):
    from plugserve.llm import LLM
    from plugserve.sampling_params import SamplingParams

    llm = LLM(platform=platform_name, load_format="dummy", dummy_config=TINY_LLAMA, dtype=dtype,
              quantization="none", max_model_len=512, kv_cache_memory=32 * 2**20, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=TOP_K)
    outs = llm.generate(_prompts(), params)
    result = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]
    del llm
    gc.collect()
    return result


_REFERENCE_CACHE: dict[str, list] = {}


def _reference(dtype: str):
    if dtype not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[dtype] = _generate(REFERENCE_PLATFORM, dtype)
    return _REFERENCE_CACHE[dtype]


def _greedy(dtype: torch.dtype):
    def run(t):
        if dtype not in t.cls.supported_dtypes:
            raise Unsupported(f"platform does not support {dtype}", code="unsupported-dtype")
        with visible_to_engine(t):
            ours = _generate(t.name, str(dtype).removeprefix("torch."))
        ref = _reference(str(dtype).removeprefix("torch."))
        if dtype == torch.float32:
            for i, ((a, _), (b, _)) in enumerate(zip(ours, ref)):
                check(a == b, f"prompt {i}: greedy tokens {a} differ from the reference's {b}")
            return {"prompts": len(ref), "tokens": sum(len(b) for b, _ in ref)}
        worst = 0.0
        for i, ((toks, lps), (rtoks, rlps)) in enumerate(zip(ours, ref)):
            for step, (tok, rtok) in enumerate(zip(toks, rtoks)):
                top = dict((int(k), float(v)) for k, v in lps[step]["top_logprobs"])
                top[int(lps[step]["token_id"])] = float(lps[step]["logprob"])
                check(rtok in top, f"prompt {i} step {step}: reference token {rtok} not in the platform's top {TOP_K}")
                diff = abs(top[rtok] - rlps[step]["logprob"])
                worst = max(worst, diff)
                check(diff <= E2E_BF16_LOGPROB_TOL, f"prompt {i} step {step}: logprob of token {rtok} is "
                      f"{top[rtok]:.4f}, reference {rlps[step]['logprob']:.4f} (tolerance {E2E_BF16_LOGPROB_TOL})")
                if tok != rtok:
                    break
        return {"max_logprob_diff": worst}
    return run


def cases(target, sweep: str) -> list[Case]:
    return [Case(f"e2e/greedy-tiny-llama-{dtype_name(d)}", "e2e", _greedy(d))
            for d in (torch.float32, torch.bfloat16) if d in target.cls.supported_dtypes]
