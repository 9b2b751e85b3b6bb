"""plugserve vs transformers vs llama.cpp on the CPU, same GGUF (SmolLM2-135M-Instruct Q4_1), same thread count.

Each configuration runs in its own subprocess (clean thread pool and memory) and reports
512-token prefill tok/s, batch-1 decode tok/s (median of --iters) and 32 x (128 in, 128 out) throughput.
    .venv/bin/python benchmarks/cpu_compare.py --threads 2 [--only plugserve-int4,llama.cpp] [--quick]
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

CONFIGS = ["plugserve-int4", "plugserve-bf16", "plugserve-fp32", "transformers-fp32", "transformers-bf16", "llama.cpp"]


def _prompts(n, length, vocab=49152, seed=0):
    import random
    rng = random.Random(seed)
    return [[rng.randrange(256, vocab) for _ in range(length)] for _ in range(n)]


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def gguf_path():
    from plugserve.loader import default_model_path
    return default_model_path()


def run_plugserve(kind, a):
    from plugserve import LLM, SamplingParams
    kw = {"int4": dict(dtype="float32", quantization="auto"), "bf16": dict(dtype="bfloat16", quantization="none"),
          "fp32": dict(dtype="float32", quantization="none")}[kind]
    e = LLM(platform="cpu", max_num_seqs=a.num_seqs, kv_cache_memory=512 * 2**20, **kw).engine
    greedy = lambda n: SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0)  # noqa: E731
    e.add_request("w", _prompts(1, 64, seed=99)[0], greedy(4))
    while e.has_unfinished_requests():
        e.step()
    pre, dec = [], []
    for it in range(a.iters):
        e.add_request(f"l{it}", _prompts(1, a.prefill_len, seed=it + 1)[0], greedy(a.decode_len + 1))
        t0 = time.perf_counter()
        e.step()
        t1 = time.perf_counter()
        while e.has_unfinished_requests():
            e.step()
        t2 = time.perf_counter()
        pre.append(t1 - t0)
        dec.append((t2 - t1) / a.decode_len)
    t0 = time.perf_counter()
    for i, p in enumerate(_prompts(a.num_seqs, a.tp_in, seed=1000)):
        e.add_request(f"t{i}", p, greedy(a.tp_out))
    while e.has_unfinished_requests():
        e.step()
    el = time.perf_counter() - t0
    return pre, dec, el


def run_transformers(kind, a):
    import torch
    from transformers import AutoModelForCausalLM
    path = gguf_path()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[kind]
    m = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype).eval()
    gen = dict(do_sample=False, pad_token_id=0)
    pre, dec = [], []
    with torch.inference_mode():
        m.generate(torch.tensor(_prompts(1, 64, seed=99)), max_new_tokens=4, min_new_tokens=4, **gen)
        for it in range(a.iters):
            ids = torch.tensor(_prompts(1, a.prefill_len, seed=it + 1))
            t0 = time.perf_counter()
            m.generate(ids, max_new_tokens=1, min_new_tokens=1, **gen)
            t1 = time.perf_counter()
            m.generate(ids, max_new_tokens=a.decode_len + 1, min_new_tokens=a.decode_len + 1, **gen)
            t2 = time.perf_counter()
            pre.append(t1 - t0)
            dec.append((t2 - t1 - (t1 - t0)) / a.decode_len)
        ids = torch.tensor(_prompts(a.num_seqs, a.tp_in, seed=1000))
        t0 = time.perf_counter()
        m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.tp_out, min_new_tokens=a.tp_out, **gen)
        el = time.perf_counter() - t0
    return pre, dec, el


def run_llamacpp(a):
    from llama_cpp import Llama
    llm = Llama(model_path=gguf_path(), n_threads=a.threads, n_threads_batch=a.threads, n_ctx=1024, n_batch=512, logits_all=True,
                verbose=False)

    def generate(prompt, n):
        llm.reset()
        llm.eval(prompt)
        for _ in range(n):
            tok = int(llm.scores[llm.n_tokens - 1].argmax())  # greedy, EOS ignored
            llm.eval([tok])
    generate(_prompts(1, 64, seed=99)[0], 4)
    pre, dec = [], []
    for it in range(a.iters):
        p = _prompts(1, a.prefill_len, seed=it + 1)[0]
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(p)
        t1 = time.perf_counter()
        for _ in range(a.decode_len):
            llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
        t2 = time.perf_counter()
        pre.append(t1 - t0)
        dec.append((t2 - t1) / a.decode_len)
    # llama-cpp-python serves one sequence at a time: the 32 requests run back to back
    t0 = time.perf_counter()
    for p in _prompts(a.num_seqs, a.tp_in, seed=1000):
        generate(p, a.tp_out)
    el = time.perf_counter() - t0
    return pre, dec, el


def child(name, a):
    import torch
    torch.set_num_threads(a.threads)
    os.environ["PLUGSERVE_CPU_THREADS"] = str(a.threads)
    if name.startswith("plugserve-"):
        pre, dec, el = run_plugserve(name.split("-")[1], a)
    elif name.startswith("transformers-"):
        pre, dec, el = run_transformers(name.split("-")[1], a)
    else:
        pre, dec, el = run_llamacpp(a)
    return {"config": name, "prefill_tok_s": round(a.prefill_len / _median(pre), 1),
            "decode_tok_s": round(1 / _median(dec), 1), "decode_ms_per_tok": round(_median(dec) * 1000, 2),
            "throughput_out_tok_s": round(a.num_seqs * a.tp_out / el, 1),
            "throughput_total_tok_s": round(a.num_seqs * (a.tp_in + a.tp_out) / el, 1),
            "throughput_elapsed_s": round(el, 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", help="comma-separated subset of " + ",".join(CONFIGS))
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--decode-len", type=int, default=64)
    ap.add_argument("--num-seqs", type=int, default=32)
    ap.add_argument("--tp-in", type=int, default=128)
    ap.add_argument("--tp-out", type=int, default=128)
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a)), flush=True)
        return
    names = a.only.split(",") if a.only else CONFIGS
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    print(f"# {cpu}, {os.cpu_count()} logical CPUs, {a.threads} threads, load avg {os.getloadavg()}", flush=True)
    rows = []
    for n in names:
        cmd = [sys.executable, __file__, "--child", n] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k not in ("only", "child")]
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
        row = json.loads(line[7:]) if line else {"config": n, "error": (p.stderr or p.stdout)[-400:]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"# load avg after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
