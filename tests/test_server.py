"""The real `compress serve` process on 127.0.0.1 with a tiny Gemma 3: openai client, raw HTTP errors.

One server (with an API key) serves every test: completions and chat, streaming and not (stream
text equals the non-stream text; greedy text equals the offline engine), /v1/models, /metrics, 401s,
a 400 with an OpenAI error body for each bad input (and the server keeps serving), and a client that
disconnects mid-stream, which must abort the request and free its KV blocks.
"""

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from serve_fixtures import gemma3_config, random_model, save_model

KEY = "sk-test"
MODEL = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port, method, path, body=None, key=KEY, raw: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn.request(method, path, raw if raw is not None else (json.dumps(body) if body is not None else None), headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = save_model(random_model(gemma3_config(), seed=5), tmp_path_factory.mktemp("m") / MODEL)
    port = free_port()
    cmd = [sys.executable, "-m", "compress", "serve", str(path), "--port", str(port), "--api-key", KEY,
           "--block-size", "4", "--max-num-seqs", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if request(port, "GET", "/health", key=None)[0] == 200:
                break
        except OSError:
            time.sleep(0.3)
        assert proc.poll() is None, proc.stdout.read()
    yield port, path
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server[0]}/v1", api_key=KEY, max_retries=0)


def test_completion_matches_offline_engine_and_stream(client, server):
    from serve import LLM, SamplingParams
    result = client.completions.create(model=MODEL, prompt="hello world", max_tokens=8, temperature=0)
    expected = LLM(server[1]).generate("hello world", SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
    assert result.choices[0].text == expected.text
    assert result.usage.completion_tokens == len(expected.token_ids)
    stream = client.completions.create(model=MODEL, prompt="hello world", max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == result.choices[0].text
    assert chunks[-1].choices[0].finish_reason == result.choices[0].finish_reason


def test_chat_stream_and_not(client):
    messages = [{"role": "user", "content": "how are you?"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert full.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 6


def test_sampling_n_seed_logprobs(client):
    kw = dict(model=MODEL, prompt="the quick", max_tokens=5, temperature=1.0, seed=7, n=2, logprobs=2)
    first, second = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len(first.choices) == 2 and len(first.choices[0].logprobs.token_logprobs) == 5


def test_models_and_metrics(client, server):
    assert [m.id for m in client.models.list()] == [MODEL]
    status, body = request(server[0], "GET", "/metrics", key=None)
    assert status == 200 and b"serve_generation_tokens_total" in body and b"serve_kv_blocks_used" in body


@pytest.mark.parametrize("key", [None, "wrong"])
def test_missing_or_wrong_key_is_401(server, key):
    status, body = request(server[0], "POST", "/v1/completions", {"model": MODEL, "prompt": "hi"}, key=key)
    assert status == 401 and "error" in json.loads(body)


BAD = {
    "malformed json": b'{"model": "tiny", "prompt": "hi"',
    "not an object": [1, 2],
    "missing prompt": {"model": MODEL},
    "missing model": {"prompt": "hi"},
    "mistyped max_tokens": {"model": MODEL, "prompt": "hi", "max_tokens": "5"},
    "mistyped temperature": {"model": MODEL, "prompt": "hi", "temperature": True},
    "max_tokens zero": {"model": MODEL, "prompt": "hi", "max_tokens": 0},
    "max_tokens past context": {"model": MODEL, "prompt": "hi", "max_tokens": 10_000},
    "prompt past context": {"model": MODEL, "prompt": "word " * 400, "max_tokens": 1},
    "unknown model": {"model": "gpt-17", "prompt": "hi"},
    "negative temperature": {"model": MODEL, "prompt": "hi", "temperature": -0.5},
    "top_p zero": {"model": MODEL, "prompt": "hi", "top_p": 0},
    "top_p above one": {"model": MODEL, "prompt": "hi", "top_p": 1.5},
    "n over limit": {"model": MODEL, "prompt": "hi", "n": 1000},
    "empty prompt": {"model": MODEL, "prompt": ""},
    "empty token list": {"model": MODEL, "prompt": []},
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_400_and_server_keeps_serving(server, case):
    body = BAD[case]
    raw = body if isinstance(body, bytes) else None
    status, data = request(server[0], "POST", "/v1/completions", None if raw else body, raw=raw)
    assert status == 400, data
    assert json.loads(data)["error"]["message"]
    ok, _ = request(server[0], "POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1})
    assert ok == 200


@pytest.mark.parametrize("body", [{"model": MODEL}, {"model": MODEL, "messages": []},
                                  {"model": MODEL, "messages": [{"role": "user"}]}])
def test_bad_chat_is_400(server, body):
    assert request(server[0], "POST", "/v1/chat/completions", body)[0] == 400


def metric(port, name) -> float:
    text = request(port, "GET", "/metrics", key=None)[1].decode()
    return float(next(l.split()[1] for l in text.splitlines() if l.startswith(name + " ")))


def test_disconnect_aborts_and_frees_blocks(server):
    port = server[0]
    aborted = metric(port, "serve_requests_aborted_total")
    sock = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 110, "stream": True, "ignore_eos": True})
    sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
    assert b"200" in sock.recv(4096).split(b"\r\n")[0]
    sock.close()
    deadline = time.time() + 30
    while time.time() < deadline and metric(port, "serve_requests_aborted_total") == aborted:
        time.sleep(0.1)
    assert metric(port, "serve_requests_aborted_total") == aborted + 1
    assert metric(port, "serve_kv_blocks_used") == 0 and metric(port, "serve_requests_running") == 0


@pytest.mark.parametrize("model_type, message", [("t5", "not supported"), ("bert", "no model.safetensors")])
def test_unservable_model_dir_is_one_line_exit_2(tmp_path, model_type, message):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    proc = subprocess.run([sys.executable, "-m", "compress", "serve", str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr


@pytest.mark.parametrize("path", ["/v1/embeddings", "/classify"])
def test_a_decoder_asked_for_embeddings_is_400(server, path):
    status, data = request(server[0], "POST", path, {"model": MODEL, "input": "hi"})
    assert status == 400 and "decoder" in json.loads(data)["error"]["message"]


@pytest.mark.parametrize("flags, overlap, eager", [([], True, False), (["--no-overlap", "--enforce-eager"], False, True)])
def test_serve_flags_reach_the_engine_config(tmp_path, monkeypatch, flags, overlap, eager):
    import serve.engine
    import serve.server
    from compress.cli import main

    seen = {}
    monkeypatch.setattr(serve.engine, "LLMEngine", lambda config: SimpleNamespace(config=seen.setdefault("config", config),
                                                                                   startup_report=[]))
    monkeypatch.setattr(serve.server, "serve_forever", lambda *args: None)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    assert main(["serve", str(tmp_path), *flags]) == 0
    assert (seen["config"].overlap, seen["config"].enforce_eager) == (overlap, eager)
