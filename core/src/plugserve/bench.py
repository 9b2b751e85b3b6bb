"""`plugserve bench`: offline throughput and batch-1 latency of the engine, printed as JSON.

throughput: N requests (random token prompts, seeded, or lines of --prompts-file) submitted at once,
            each generating exactly --output-len tokens (EOS ignored); reports output tok/s, total tok/s.
latency:    one request at a time: prefill tok/s on an --input-len prompt (time to its first token) and
            decode ms/token over --output-len further tokens; the median over --num-iters runs.
"""
import json
import random
import statistics
import sys
import time


def random_prompts(num: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Seeded random token ids, away from the low ids where tokenizers keep their special tokens."""
    rng = random.Random(seed)
    low = min(256, vocab_size // 4)
    return [[rng.randrange(low, vocab_size) for _ in range(input_len)] for _ in range(num)]


def _prompts(engine, args, num: int, seed: int) -> list:
    if args.prompts_file:
        with open(args.prompts_file) as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
        if not lines:
            raise ValueError(f"{args.prompts_file} holds no prompts")
        return [lines[i % len(lines)] for i in range(num)]
    return random_prompts(num, args.input_len, engine.model_config.vocab_size, seed)


def _progress(total: int, desc: str, disable: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=disable, unit="tok")


def _drain(engine, counted: set[str] | None = None) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def _warmup(engine, input_len: int, output_len: int, seed: int) -> None:
    from plugserve.sampling_params import SamplingParams
    prompt = random_prompts(1, max(1, input_len), engine.model_config.vocab_size, seed + 10_000)[0]
    engine.add_request("bench-warmup", prompt, SamplingParams(max_tokens=max(2, output_len), ignore_eos=True,
                                                              temperature=0.0))
    _drain(engine)


def throughput(engine, args) -> dict:
    from plugserve.sampling_params import SamplingParams

    prompts = _prompts(engine, args, args.num_prompts, args.seed)
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0)
    if args.warmup:
        _warmup(engine, min(args.input_len, 32), 4, args.seed)
    total_out = args.num_prompts * args.output_len
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"bench-{i}", p, params)
    prompt_tokens = sum(len(engine.requests[f"bench-{i}"].prompt_token_ids) for i in range(len(prompts)))
    out_tokens = 0
    with _progress(total_out, "output tokens", args.no_progress) as bar:
        seen: dict[str, int] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                n = len(out.outputs[0].token_ids)
                bar.update(n - seen.get(out.request_id, 0))
                seen[out.request_id] = n
        out_tokens = sum(seen.values())
    elapsed = time.perf_counter() - start
    return {"mode": "throughput", "num_prompts": len(prompts), "input_len": args.input_len if not args.prompts_file
            else None, "output_len": args.output_len, "prompt_tokens": prompt_tokens, "output_tokens": out_tokens,
            "elapsed_s": round(elapsed, 3), "requests_per_s": round(len(prompts) / elapsed, 3),
            "output_tokens_per_s": round(out_tokens / elapsed, 2),
            "total_tokens_per_s": round((out_tokens + prompt_tokens) / elapsed, 2)}


def latency(engine, args) -> dict:
    from plugserve.sampling_params import SamplingParams

    if args.warmup:
        _warmup(engine, args.input_len, 4, args.seed)
    prefill, decode = [], []
    with _progress(args.num_iters * (args.output_len + 1), "tokens", args.no_progress) as bar:
        for it in range(args.num_iters):
            # a fresh random prompt per iteration, so the prefix cache never shortcuts the prefill
            prompt = random_prompts(1, args.input_len, engine.model_config.vocab_size, args.seed + it)[0]
            engine.add_request(f"lat-{it}", prompt, SamplingParams(max_tokens=args.output_len + 1, ignore_eos=True,
                                                                    temperature=0.0))
            t0 = time.perf_counter()
            n = 0
            while n == 0:  # a prompt longer than the step's token budget takes several steps
                outs = engine.step()
                n = len(outs[0].outputs[0].token_ids) if outs else 0
            t1 = time.perf_counter()
            bar.update(1)
            while engine.has_unfinished_requests():
                engine.step()
                bar.update(1)
            t2 = time.perf_counter()
            prefill.append(t1 - t0)
            decode.append((t2 - t1) / args.output_len)
    p, d = statistics.median(prefill), statistics.median(decode)
    return {"mode": "latency", "input_len": args.input_len, "output_len": args.output_len,
            "num_iters": args.num_iters, "prefill_s": round(p, 4), "prefill_tokens_per_s": round(args.input_len / p, 1),
            "decode_ms_per_token": round(d * 1000, 3), "decode_tokens_per_s": round(1 / d, 1)}


def add_bench_args(p) -> None:
    p.add_argument("mode", choices=["throughput", "latency"])
    p.add_argument("--num-prompts", type=int, default=32, help="throughput: number of requests")
    p.add_argument("--input-len", type=int, default=None,
                   help="prompt length in tokens (default: 128 for throughput, 512 for latency)")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prompts-file", help="throughput: one prompt per line (cycled) instead of random tokens")
    p.add_argument("--num-iters", type=int, default=3, help="latency: runs to take the median of")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--threads", type=int, help="torch.set_num_threads before loading")


def run_bench(args, make_engine) -> int:
    if args.input_len is None:
        args.input_len = 512 if args.mode == "latency" else 128
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    engine = make_engine(args)
    result = (throughput if args.mode == "throughput" else latency)(engine, args)
    import torch
    result.update({"model": engine.model_name, "platform": engine.platform_name, "device": engine.device_description,
                   "dtype": str(engine.platform_config.dtype).removeprefix("torch."),
                   "quantization": engine.platform_config.quantization, "torch_threads": torch.get_num_threads()})
    print(json.dumps(result, indent=2))
    return 0
