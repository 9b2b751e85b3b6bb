"""GPU benchmarks of issue 6, side by side in one process: plugserve (CUDA platform) against
Hugging Face transformers on the same random-weight shapes, and the memory roofline.

    python benchmarks/gpu_bench.py --out results.json [--shapes 1b,qwen3] [--skip-hf]

Roofline of a batch-1 decode step: bytes of weights read / device-to-device copy bandwidth
measured here (a copy reads and writes, so bandwidth = 2 * bytes / time).
"""
import argparse
import json
import random
import time

import torch

SHAPES = {
    "1b": dict(architectures=["LlamaForCausalLM"], hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, rope_theta=500000.0,
               rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=True),
    "8b": dict(architectures=["LlamaForCausalLM"], hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
               rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=False),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, intermediate_size=3072, vocab_size=151936,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=True),
}


def copy_bandwidth() -> float:
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - t)


def weight_bytes(cfg: dict) -> int:
    h, L, f, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    d = cfg.get("head_dim", h // cfg["num_attention_heads"])
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * f
    return 2 * (L * per_layer + v * h)  # bf16; the LM head is read once per step (embedding lookups are tiny)


def plugserve_engine(cfg: dict, max_num_seqs: int, graphs: bool = True):
    from plugserve.config import EngineConfig
    from plugserve.engine import LLMEngine
    return LLMEngine(EngineConfig(load_format="dummy", dummy_config=cfg, platform="cuda", dtype="bfloat16",
                                  max_model_len=2048, max_num_seqs=max_num_seqs, max_num_batched_tokens=8192,
                                  kv_cache_memory_fraction=0.5))


def run_requests(engine, prompts, out_lens) -> float:
    from plugserve.sampling_params import SamplingParams
    for i, (p, n) in enumerate(zip(prompts, out_lens)):
        engine.add_request(f"r{i}-{time.monotonic_ns()}", p, SamplingParams(max_tokens=n, ignore_eos=True,
                                                                             temperature=0))
    torch.cuda.synchronize()
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def decode_ms(engine, vocab: int, batch: int, prompt_len: int = 128, new: int = 128) -> float:
    rng = random.Random(batch)
    prompts = [[rng.randrange(256, vocab) for _ in range(prompt_len)] for _ in range(batch)]
    run_requests(engine, prompts, [2] * batch)  # warm-up
    prefill_only = run_requests(engine, prompts, [1] * batch)
    total = run_requests(engine, prompts, [new] * batch)
    return (total - prefill_only) / (new - 1) * 1000


def hf_model(cfg: dict):
    import transformers
    config = transformers.AutoConfig.for_model(model_type="qwen3" if "Qwen3" in cfg["architectures"][0] else "llama",
                                               **{k: v for k, v in cfg.items() if k != "architectures"})
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                              attn_implementation="sdpa")
    return model.eval()


def hf_decode_ms(model, vocab: int, batch: int, prompt_len: int = 128, new: int = 128) -> float:
    ids = torch.randint(256, vocab, (batch, prompt_len), device="cuda")
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
        torch.cuda.synchronize()
    return (time.perf_counter() - t - prefill) / (new - 1) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="1b,qwen3")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    bw = copy_bandwidth()
    res["copy_bandwidth_GBps"] = round(bw / 1e9, 1)

    def save():
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(json.dumps(res), flush=True)

    for shape in args.shapes.split(","):
        cfg = SHAPES[shape]
        entry = res.setdefault(shape, {})
        entry["roofline_ms"] = round(weight_bytes(cfg) / bw * 1000, 3)
        if shape == "qwen3":  # nano-vllm's offline workload
            engine = plugserve_engine(cfg, max_num_seqs=256)
            rng = random.Random(0)
            prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(256)]
            outs = [rng.randint(100, 1024) for _ in range(256)]
            run_requests(engine, prompts[:4], [4] * 4)
            elapsed = run_requests(engine, prompts, outs)
            entry["nano_vllm_workload"] = {"output_tokens": sum(outs), "elapsed_s": round(elapsed, 2),
                                           "output_tok_per_s": round(sum(outs) / elapsed, 1)}
            save()
        else:
            engine = plugserve_engine(cfg, max_num_seqs=64)
            entry["plugserve_decode_ms"] = {b: round(decode_ms(engine, cfg["vocab_size"], int(b)), 3)
                                            for b in args.batches.split(",")}
            rng = random.Random(1)
            prompts = [[rng.randrange(256, cfg["vocab_size"]) for _ in range(512)] for _ in range(64)]
            elapsed = run_requests(engine, prompts, [128] * 64)
            entry["plugserve_64x512_128_tok_per_s"] = round(64 * 128 / elapsed, 1)
            save()
            del engine
            torch.cuda.empty_cache()
            if not args.skip_hf:
                model = hf_model(cfg)
                entry["hf_decode_ms"] = {b: round(hf_decode_ms(model, cfg["vocab_size"], int(b)), 3)
                                         for b in args.batches.split(",")}
                ids = torch.randint(256, cfg["vocab_size"], (64, 512), device="cuda")
                with torch.no_grad():
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    model.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0)
                    torch.cuda.synchronize()
                entry["hf_64x512_128_tok_per_s"] = round(64 * 128 / (time.perf_counter() - t), 1)
                del model
                torch.cuda.empty_cache()
                save()
    save()


if __name__ == "__main__":
    main()
