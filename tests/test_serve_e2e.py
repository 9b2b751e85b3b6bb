"""A real `plugserve serve` process with the default model, driven by the official openai client."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

PLUGSERVE = Path(sys.executable).parent / "plugserve"
MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    proc = subprocess.Popen([str(PLUGSERVE), "serve", "--port", str(port), "--max-model-len", "1024"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("server did not become ready")
    yield base
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused")


def test_models_and_version(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    version = httpx.get(f"{server}/version").json()
    assert version["platform"] == "cpu"


def test_chat_answers_and_usage_adds_up(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                       temperature=0, max_tokens=24)
    assert "Paris" in r.choices[0].message.content
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.completion_tokens <= 24


def test_streaming_equals_non_streaming(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=16)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    text, usage = "", None
    for chunk in chunks:
        if chunk.choices:
            text += chunk.choices[0].text
        if chunk.usage:
            usage = chunk.usage
    assert text == whole and usage.completion_tokens == 16


def test_stop_max_tokens_n_and_seed(client):
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=20, stop=[" 7"])
    assert r.choices[0].finish_reason == "stop" and " 7" not in r.choices[0].text
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, n=2, temperature=1.0, seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1]
    again = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, n=2, temperature=1.0, seed=3)
    assert [c.text for c in r.choices] == [c.text for c in again.choices]


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(c.logprob <= 0 and len(c.top_logprobs) == 2 for c in content)


def test_bad_request_then_good(server, client):
    bad = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 5000})
    assert bad.status_code == 400 and "1024" in bad.json()["error"]["message"]
    bad = httpx.post(f"{server}/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
