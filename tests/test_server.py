"""OpenAI-compatible server tests, run against a deterministic fake engine.

Most tests talk to a real uvicorn server on a free 127.0.0.1 port (httpx and
the official ``openai`` client); a few use httpx's ASGI transport.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import openai
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from fake_engine import GEN_WORDS, FakeEngine  # noqa: E402

from plugserve.server import AsyncEngineClient, build_app  # noqa: E402
from plugserve.server.run import make_server  # noqa: E402

MODEL = "fake-model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(engine: FakeEngine | None = None, **kwargs):
    engine = engine or FakeEngine()
    port = free_port()
    server = make_server(engine, "127.0.0.1", port, log_level="warning", **kwargs)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", server, engine
    finally:
        server.should_exit = True
        thread.join(10)


def wait_idle(client: AsyncEngineClient, timeout: float = 5.0) -> dict:
    """Wait until the engine thread reports no running requests and no KV blocks in use."""
    deadline = time.monotonic() + timeout
    while True:
        stats = client.stats()
        if (stats["num_running"] == 0 and stats["num_waiting"] == 0
                and stats["num_kv_blocks_used"] == 0 and client.num_in_flight == 0):
            return stats
        assert time.monotonic() < deadline, f"engine not idle: {stats}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def srv():
    with running_server(max_body_bytes=65536) as s:
        yield s


@pytest.fixture(scope="module")
def oai(srv):
    url, _, _ = srv
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def sse_events(resp: httpx.Response) -> list:
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# ------------------------------------------------------------------ basic endpoints

def test_info_endpoints(srv):
    url, _, _ = srv
    with httpx.Client(base_url=url) as c:
        assert c.get("/health").json() == {"status": "ok"}
        models = c.get("/v1/models").json()
        assert models["object"] == "list" and models["data"][0]["id"] == MODEL
        assert models["data"][0]["max_model_len"] == 256
        assert c.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
        v = c.get("/version").json()
        assert v["platform"] == "fake" and v["device"].startswith("fake device") and v["version"]
        m = c.get("/metrics")
        assert m.status_code == 200 and "plugserve_num_requests_running" in m.text
        assert "access-control-allow-origin" not in c.get("/health", headers={"Origin": "http://x"}).headers


def test_chat_and_completion(oai, srv):
    _, _, engine = srv
    chat = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello world"}],
                                       max_tokens=5, temperature=0)
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    choice = chat.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert len(choice.message.content.split()) == 5
    assert all(w in GEN_WORDS for w in choice.message.content.split())
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "hello world"}],
                                                  add_generation_prompt=True, tokenize=False)
    n_prompt = len(engine.tokenizer.encode(prompt, add_special_tokens=False))
    assert chat.usage.prompt_tokens == n_prompt
    assert chat.usage.completion_tokens == 5 and chat.usage.total_tokens == n_prompt + 5

    # list-of-parts content and max_completion_tokens
    parts = oai.chat.completions.create(
        model=MODEL, temperature=0, max_completion_tokens=3,
        messages=[{"role": "system", "content": "say hello"},
                  {"role": "user", "content": [{"type": "text", "text": "tell"},
                                               {"type": "text", "text": "story"}]}])
    assert parts.usage.completion_tokens == 3

    comp = oai.completions.create(model=MODEL, prompt="hello world", max_tokens=7, temperature=0)
    assert comp.object == "text_completion" and comp.choices[0].finish_reason == "length"
    assert len(comp.choices[0].text.split()) == 7
    assert comp.usage.prompt_tokens == 2 and comp.usage.total_tokens == 9
    # greedy is deterministic
    again = oai.completions.create(model=MODEL, prompt="hello world", max_tokens=7, temperature=0)
    assert again.choices[0].text == comp.choices[0].text

    # batch of prompts: choices indexed prompt-major, usage summed
    batch = oai.completions.create(model=MODEL, prompt=["hello", "hello world"], max_tokens=2, n=2,
                                   temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.usage.prompt_tokens == 3 and batch.usage.completion_tokens == 8

    # EOS ends generation with "stop"
    bye = oai.completions.create(model=MODEL, prompt="bye", max_tokens=20, temperature=0)
    assert bye.choices[0].finish_reason == "stop" and bye.usage.completion_tokens == 4


def test_streaming_matches_non_streaming(oai):
    msgs = [{"role": "user", "content": "tell me a story"}]
    full = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=9, temperature=0)
    stream = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=9, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])

    comp = oai.completions.create(model=MODEL, prompt="count", max_tokens=6, temperature=0)
    parts = list(oai.completions.create(model=MODEL, prompt="count", max_tokens=6, temperature=0,
                                        stream=True))
    assert "".join(p.choices[0].text for p in parts) == comp.choices[0].text
    assert parts[-1].choices[0].finish_reason == "length"


def test_sse_wire_format(srv):
    url, _, _ = srv
    with httpx.Client(base_url=url) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "hello", "max_tokens": 3,
                                                       "stream": True}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            raw = r.read().decode()
    blocks = raw.split("\n\n")
    assert blocks[-1] == "" and blocks[-2] == "data: [DONE]"
    assert all(b.startswith("data: {") for b in blocks[:-2])


def test_stop_strings(oai):
    base = oai.completions.create(model=MODEL, prompt="hello", max_tokens=8, temperature=0)
    words = base.choices[0].text.split()
    stop_word = words[3]
    expected = " ".join(words[:3]) + " "
    res = oai.completions.create(model=MODEL, prompt="hello", max_tokens=8, temperature=0,
                                 stop=[stop_word, "zzz-never"])
    assert res.choices[0].text == expected and res.choices[0].finish_reason == "stop"
    streamed = list(oai.completions.create(model=MODEL, prompt="hello", max_tokens=8, temperature=0,
                                           stop=stop_word, stream=True))
    assert "".join(p.choices[0].text for p in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"
    inc = oai.completions.create(model=MODEL, prompt="hello", max_tokens=8, temperature=0,
                                 stop=stop_word, extra_body={"include_stop_str_in_output": True})
    assert inc.choices[0].text == expected + stop_word
    chat = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                       max_tokens=8, temperature=0)
    w = chat.choices[0].message.content.split()
    chat_stop = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=8, temperature=0, stop=w[2])
    assert chat_stop.choices[0].message.content == " ".join(w[:2]) + " "


def test_n_and_seed(oai):
    msgs = [{"role": "user", "content": "hello"}]
    r = oai.chat.completions.create(model=MODEL, messages=msgs, n=2, max_tokens=6, seed=7,
                                    temperature=1.0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content != r.choices[1].message.content
    assert r.usage.completion_tokens == 12
    r2 = oai.chat.completions.create(model=MODEL, messages=msgs, n=2, max_tokens=6, seed=7,
                                     temperature=1.0)
    assert [c.message.content for c in r2.choices] == [c.message.content for c in r.choices]
    other = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, seed=8,
                                        temperature=1.0)
    assert other.choices[0].message.content != r.choices[0].message.content

    # streaming n=2: each choice reassembles to the non-streamed text
    chunks = list(oai.chat.completions.create(model=MODEL, messages=msgs, n=2, max_tokens=6, seed=7,
                                              temperature=1.0, stream=True))
    texts = {0: "", 1: ""}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
    assert [texts[0], texts[1]] == [c.message.content for c in r.choices]
    comp = list(oai.completions.create(model=MODEL, prompt="hello", n=2, max_tokens=4, seed=3,
                                       stream=True))
    assert {p.choices[0].index for p in comp} == {0, 1}


def test_logprobs(oai, srv):
    _, _, engine = srv
    r = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                    max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    assert " ".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        assert e.logprob < 0 and e.bytes == list(e.token.encode())
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
    streamed = list(oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0,
        logprobs=True, top_logprobs=3, stream=True))
    s_tokens = [e.token for ch in streamed for c in ch.choices if c.logprobs for e in c.logprobs.content]
    assert s_tokens == [e.token for e in content]
    plain = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                        max_tokens=2)
    assert plain.choices[0].logprobs is None

    c = oai.completions.create(model=MODEL, prompt="hello", max_tokens=5, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    parts = list(oai.completions.create(model=MODEL, prompt="hello", max_tokens=5, temperature=0,
                                        logprobs=2, stream=True))
    assert [t for p in parts if p.choices[0].logprobs for t in p.choices[0].logprobs.tokens] == lp.tokens
    offsets = [o for p in parts if p.choices[0].logprobs for o in p.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset


def test_echo(srv):
    url, _, _ = srv
    r = httpx.post(url + "/v1/completions", json={"prompt": "hello world", "max_tokens": 2, "echo": True,
                                                  "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("hello world")


# ------------------------------------------------------------------ errors

BAD_REQUESTS = [
    # (name, path, body (bytes or json), expected status, expected param or None)
    ("malformed json", "/v1/completions", b'{"prompt": ', 400, None),
    ("invalid utf-8", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400, None),
    ("json array", "/v1/completions", b"[1, 2]", 400, None),
    ("empty body", "/v1/chat/completions", b"", 400, None),
    ("NaN literal", "/v1/completions", b'{"prompt": "a", "temperature": NaN}', 400, None),
    ("missing prompt", "/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("messages not a list", "/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0].role"),
    ("image part", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content"),
    ("negative temperature", "/v1/completions", {"prompt": "a", "temperature": -1}, 400, "temperature"),
    ("string temperature", "/v1/completions", {"prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ("top_p zero", "/v1/completions", {"prompt": "a", "top_p": 0}, 400, "top_p"),
    ("n too large", "/v1/completions", {"prompt": "a", "n": 1000}, 400, "n"),
    ("n zero", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "n": 0}, 400, "n"),
    ("max_tokens zero", "/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens string", "/v1/completions", {"prompt": "a", "max_tokens": "ten"}, 400, "max_tokens"),
    ("logprobs too many", "/v1/completions", {"prompt": "a", "logprobs": 50}, 400, "logprobs"),
    ("top_logprobs without logprobs", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, 400, None),
    ("stop wrong type", "/v1/completions", {"prompt": "a", "stop": 5}, 400, "stop"),
    ("empty stop string", "/v1/completions", {"prompt": "a", "stop": [""]}, 400, "stop"),
    ("presence_penalty range", "/v1/completions", {"prompt": "a", "presence_penalty": 5}, 400,
     "presence_penalty"),
    ("top_k invalid", "/v1/completions", {"prompt": "a", "top_k": -5}, 400, "top_k"),
    ("seed not int", "/v1/completions", {"prompt": "a", "seed": "abc"}, 400, "seed"),
    ("stream_options without stream", "/v1/completions",
     {"prompt": "a", "stream_options": {"include_usage": True}}, 400, None),
    ("empty prompt list", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("prompt object", "/v1/completions", {"prompt": {"a": 1}}, 400, "prompt"),
    ("empty prompt string", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("token id out of range", "/v1/completions", {"prompt": [999999]}, 400, None),
    ("tools unsupported", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ("unknown model", "/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ("context too long", "/v1/completions", {"prompt": "a", "max_tokens": 10000}, 400, "max_tokens"),
    ("body too large", "/v1/completions", {"prompt": "a " * 40000}, 413, None),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests(srv, name, path, body, status, param):
    url, _, _ = srv
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if name == "context too long":
        assert "256" in err["message"] and "10001" in err["message"]


def test_other_http_errors_and_recovery(srv):
    url, _, _ = srv
    with httpx.Client(base_url=url) as c:
        for method, path, status in (("GET", "/v1/nope", 404), ("GET", "/v1/completions", 405),
                                     ("GET", "/v1/models/other", 404)):
            r = c.request(method, path)
            assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
        # a good request still works after all the bad ones
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_step_failure_fails_only_that_request(srv):
    url, server, _ = srv

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            good = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 20})
            bad = c.post("/v1/completions", json={"prompt": "boom", "max_tokens": 20})
            return await asyncio.gather(good, bad)

    good, bad = asyncio.run(main())
    assert bad.status_code == 500 and bad.json()["error"]["type"] == "server_error"
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 20
    # streaming failure is reported in-band
    r = httpx.post(url + "/v1/completions", json={"prompt": "boom", "max_tokens": 5, "stream": True})
    events = sse_events(r)
    assert "error" in events[-2] and events[-1] == "[DONE]"
    wait_idle(server.engine_client)


# ------------------------------------------------------------------ auth, CORS, readiness, queue

def test_api_key():
    with running_server(api_key="s3cret") as (url, _, _):
        with httpx.Client(base_url=url) as c:
            assert c.get("/health").status_code == 200  # probes stay open
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = c.get("/v1/models", headers=headers)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert c.post("/v1/completions", json={"prompt": "a"}).status_code == 401
            assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="hello", max_tokens=2).usage.completion_tokens == 2
        bad = openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=MODEL, prompt="hello", max_tokens=2)


def test_cors_and_readiness_over_asgi():
    def slow_factory():
        time.sleep(0.3)
        return FakeEngine()

    async def main():
        client = AsyncEngineClient(slow_factory)
        app = build_app(client, cors_origins=["http://ui.example"])
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                r = await c.get("/health")
                assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
                r = await c.post("/v1/completions", json={"prompt": "a"})
                assert r.status_code == 503
                while (await c.get("/health")).status_code != 200:
                    await asyncio.sleep(0.02)
                pre = await c.options("/v1/completions", headers={
                    "Origin": "http://ui.example", "Access-Control-Request-Method": "POST"})
                assert pre.headers["access-control-allow-origin"] == "http://ui.example"
                r = await c.post("/v1/chat/completions", headers={"Origin": "http://ui.example"},
                                 json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
                assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ui.example"
                client.begin_drain()
                assert (await c.get("/health")).json()["error"]["code"] == "draining"
                assert (await c.post("/v1/completions", json={"prompt": "a"})).status_code == 503
        finally:
            client.shutdown()

    asyncio.run(main())


def test_queue_full_returns_503():
    engine = FakeEngine(max_num_seqs=1, step_delay=0.01)
    with running_server(engine, max_waiting=2) as (url, server, _):
        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=20) as c:
                reqs = [c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 5})
                        for _ in range(8)]
                return await asyncio.gather(*reqs)

        results = asyncio.run(main())
        codes = sorted(r.status_code for r in results)
        assert 503 in codes and 200 in codes
        busy = next(r for r in results if r.status_code == 503)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "queue_full"
        wait_idle(server.engine_client)
        assert httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200


# ------------------------------------------------------------------ load and disconnects

def test_load_with_disconnects():
    engine = FakeEngine(max_model_len=1024, max_num_seqs=64, step_delay=0.003)
    with running_server(engine) as (url, server, _):
        async def client(i: int, c: httpx.AsyncClient):
            quitter = i % 4 == 0
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"count {i}"}],
                    "max_tokens": 300 if quitter else 30, "stream": True,
                    "stream_options": {"include_usage": True}}
            async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                n_chunks, text, usage = 0, "", None
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    n_chunks += 1
                    if ev["choices"]:
                        text += ev["choices"][0]["delta"].get("content") or ""
                    else:
                        usage = ev["usage"]
                    if quitter and n_chunks == 5:
                        return "quit"  # leaving the context manager closes the connection
                return text, usage

        async def main():
            limits = httpx.Limits(max_connections=100)
            async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as c:
                return await asyncio.gather(*(client(i, c) for i in range(64)))

        t0 = time.monotonic()
        results = asyncio.run(main())
        elapsed = time.monotonic() - t0
        done = [r for r in results if r != "quit"]
        assert len(done) == 48 and results.count("quit") == 16
        for text, usage in done:
            assert len(text.split()) == 30 and usage["completion_tokens"] == 30
        stats = wait_idle(server.engine_client)
        assert stats["num_running"] == 0 and stats["num_kv_blocks_used"] == 0
        assert elapsed < 0.9 * 300 * 0.003 + 5  # quitters did not run to 300 tokens
        metrics = httpx.get(url + "/metrics").text
        assert 'plugserve_requests_total{endpoint="chat",outcome="aborted"} 16.0' in metrics
        assert 'plugserve_requests_total{endpoint="chat",outcome="ok"} 48.0' in metrics
        assert "plugserve_time_to_first_token_seconds_count 64.0" in metrics  # quitters got tokens too
    assert engine.num_aborted == 16


def test_non_streaming_disconnect_aborts():
    engine = FakeEngine(step_delay=0.01)
    with running_server(engine) as (url, server, _):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json={"prompt": "hello", "max_tokens": 200}, timeout=0.3)
        wait_idle(server.engine_client, timeout=1.5)  # far less than the 2 s the request would take
    assert engine.num_aborted == 1


def test_sigterm_graceful_shutdown():
    port = free_port()
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
        from fake_engine import FakeEngine
        from plugserve.server import serve
        serve(FakeEngine(step_delay=0.01), port={port}, grace_period_s=10, log_level="warning")
    """)
    proc = subprocess.Popen([sys.executable, "-c", code])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        with httpx.stream("POST", url + "/v1/completions", timeout=10,
                          json={"prompt": "hello", "max_tokens": 60, "stream": True}) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        events = [json.loads(x[6:]) for x in [first] + rest[:-1]]
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert len("".join(e["choices"][0]["text"] for e in events).split()) == 60
        proc.wait(10)
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_engine_client_survives_unattributed_step_error():
    """A step error without ``request_id`` fails every in-flight request; the loop keeps serving."""
    from plugserve.sampling_params import SamplingParams

    class Flaky(FakeEngine):
        fail_next = True

        def step(self):
            if self.fail_next and self.running:
                self.fail_next = False
                raise RuntimeError("device fell over")
            return super().step()

    engine = Flaky()

    async def main():
        client = AsyncEngineClient(engine)
        client.start()
        while not client.ready:
            await asyncio.sleep(0.01)
        ids = engine.tokenizer.encode("hello")

        async def run(rid):
            return [o async for o in client.generate(rid, ids, SamplingParams(max_tokens=3))]

        try:
            first = await asyncio.gather(run("a"), run("b"), return_exceptions=True)
            assert all(type(r).__name__ == "RequestFailedError" for r in first)
            outs = await run("c")
            assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3
        finally:
            client.shutdown()

    asyncio.run(main())
    assert engine.blocks_used == 0 and not engine.running
