"""Fault suite of the server on 127.0.0.1 with a tiny seeded Gemma 3 and a small KV pool (issue #33).

Every hostile or malformed request of evals/hostile.py gets its 4xx and an OpenAI error body while an
innocent greedy stream runs beside it and ends exactly as the offline engine says; a step that fails
for one request fails that request alone (cleanly, on a stream too); a dead engine loop shows on
/health and makes the process exit non-zero; tokenization does not hold the event loop; concurrent
streams under KV pressure and mid-stream disconnects equal sequential greedy and leak no block; a
client that sends half a body is cut off. Every client call has a deadline: a hang fails, never waits.
"""

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serve import LLM, LLMEngine, SamplingParams
from serve.config import EngineConfig
from serve.context import ENGINE, ServerLimits
from serve_fixtures import gemma3_config, random_model, save_model
from server_harness import LiveServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evals import hostile  # noqa: E402
from evals.loopback import call, in_background, metric, send_raw, stream  # noqa: E402

MODEL = "tiny"
ENGINE_ARGS = dict(block_size=4, max_num_seqs=8, max_num_batched_tokens=32, num_kv_blocks=24, max_model_len=64)
INNOCENT = {"model": MODEL, "prompt": "the quick brown fox", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
DEADLINE = 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(random_model(gemma3_config(), seed=5), tmp_path_factory.mktemp("faults") / MODEL)


@pytest.fixture(scope="module")
def engine(model_dir):
    return LLMEngine(EngineConfig(model=str(model_dir), **ENGINE_ARGS))


@pytest.fixture(scope="module")
def reference(model_dir):
    """Greedy text of a prompt, from the offline engine, one request at a time."""
    llm = LLM(model_dir, block_size=4, max_model_len=64)
    cache = {}

    def greedy(prompt, max_tokens=40):
        if (key := (str(prompt), max_tokens)) not in cache:
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            cache[key] = llm.generate(prompt, params)[0].outputs[0].text
        return cache[key]
    return greedy


@pytest.fixture(scope="module")
def server(engine):
    with LiveServer(engine, MODEL) as live:
        yield live


def assert_clean(port):
    """Nothing running, no block held, and the server still answers."""
    deadline = time.time() + DEADLINE
    while time.time() < deadline and metric(port, "serve_kv_blocks_used") != 0:
        time.sleep(0.05)
    assert metric(port, "serve_kv_blocks_used") == 0 and metric(port, "serve_requests_running") == 0
    assert call(port, "GET", "/health", timeout=5).status == 200


def corpus():
    return hostile.all_cases(MODEL, vocab_size=320, max_model_len=64, max_body_bytes=ServerLimits().max_body_bytes,
                             max_num_seqs=ENGINE_ARGS["max_num_seqs"])


@pytest.mark.parametrize("case", corpus(), ids=lambda case: case.name)
def test_hostile_request_is_refused_and_harms_no_one(server, reference, case):
    thread, innocent = in_background(stream, server.port, "/v1/completions", INNOCENT, timeout=DEADLINE)
    reply = call(server.port, case.method, case.path, raw=hostile.payload(case), timeout=DEADLINE)
    thread.join(DEADLINE)
    assert reply.status == case.expect, (reply.status, reply.error, reply.body[:300])
    assert reply.is_openai_error() == (case.expect != 200), reply.body[:300]
    got = innocent.get("value")
    assert got is not None and got.done and got.texts() == {0: reference(INNOCENT["prompt"])}
    assert_clean(server.port)


def fail_sampling_of(monkeypatch, seed):
    """Sampling raises for any batch holding a row with this seed (as a sampling bug would)."""
    import serve.engine
    real = serve.engine.sample

    def sample(logits, seqs, argmax=None):
        if any(seq.params.seed == seed for seq in seqs):
            raise RuntimeError("injected sampling fault")
        return real(logits, seqs, argmax)
    monkeypatch.setattr(serve.engine, "sample", sample)


@pytest.mark.parametrize("streamed", [False, True])
def test_a_step_failing_for_one_request_fails_it_alone(server, reference, monkeypatch, streamed):
    fail_sampling_of(monkeypatch, seed=666)
    failed = metric(server.port, "serve_requests_failed_total")
    thread, innocent = in_background(stream, server.port, "/v1/completions", INNOCENT, timeout=DEADLINE)
    bad = {"model": MODEL, "prompt": "hello", "max_tokens": 8, "temperature": 1.0, "seed": 666}
    if streamed:
        got = stream(server.port, "/v1/completions", bad, timeout=DEADLINE)
        assert got.status == 200 and got.done and got.errors() and got.errors()[0]["message"]
    else:
        reply = call(server.port, "POST", "/v1/completions", bad, timeout=DEADLINE)
        assert reply.status == 500 and reply.is_openai_error()
    thread.join(DEADLINE)
    assert innocent["value"].texts() == {0: reference(INNOCENT["prompt"])}
    assert metric(server.port, "serve_requests_failed_total") == failed + 1
    assert_clean(server.port)


def test_a_step_failing_outside_any_request_fails_the_running_ones_cleanly(server, monkeypatch):
    runner = server.app[ENGINE].engine.runner
    real, calls = runner.run, []

    def run_once_broken(batch):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected step fault")
        return real(batch)
    monkeypatch.setattr(runner, "run", run_once_broken)
    got = stream(server.port, "/v1/completions", INNOCENT, timeout=DEADLINE)
    assert got.status == 200 and got.done and got.errors(), got.events[-3:]
    assert call(server.port, "POST", "/v1/completions", {**INNOCENT, "max_tokens": 2}, timeout=DEADLINE).status == 200
    assert_clean(server.port)


def test_a_server_bug_mid_stream_ends_it_with_an_error_event(server, monkeypatch):
    """Once a stream has started, an error must not come back as an HTTP response inside its body."""
    from serve.responses import StreamState

    def broken(self, output, tokenizer):
        raise KeyError("injected")
    monkeypatch.setattr(StreamState, "deltas", broken)
    got = stream(server.port, "/v1/completions", INNOCENT, timeout=DEADLINE)
    assert got.status == 200 and got.done and got.errors() and got.error is None, got
    assert_clean(server.port)


def test_slow_tokenization_does_not_hold_the_event_loop(engine, monkeypatch):
    class SlowTokenizer:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, *args, **kwargs):
            time.sleep(3)
            return self.inner(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)
    monkeypatch.setattr(engine, "tokenizer", SlowTokenizer(engine.tokenizer))
    with LiveServer(engine, MODEL) as live:
        thread, slow = in_background(call, live.port, "POST", "/v1/completions",
                                     {"model": MODEL, "prompt": "hello", "max_tokens": 2}, timeout=DEADLINE)
        time.sleep(0.5)
        health = call(live.port, "GET", "/health", timeout=DEADLINE)
        thread.join(DEADLINE)
    assert health.status == 200 and health.seconds < 1.0, health.seconds
    assert slow["value"].status == 200


def test_concurrent_streams_under_kv_pressure_equal_sequential_greedy(server, reference):
    prompts = ["the quick brown fox", "hello world, how are", "0123456789 serving", "caf\u00e9 na\u00efve",
               "jumps over the lazy dog", "paged attention", "how are you today?", "the lazy"]
    preempted = metric(server.port, "serve_preemptions_total")
    threads = [in_background(stream, server.port, "/v1/completions", {**INNOCENT, "prompt": p, "max_tokens": 30},
                             timeout=60) for p in prompts]
    for thread, _ in threads:
        thread.join(60)
    assert [r["value"].texts() for _, r in threads] == [{0: reference(p, 30)} for p in prompts]
    assert metric(server.port, "serve_preemptions_total") > preempted       # the pool was too small for all
    assert_clean(server.port)


def test_mid_stream_disconnects_free_their_blocks(server, reference):
    aborted = metric(server.port, "serve_requests_aborted_total")
    quitters = [in_background(stream, server.port, "/v1/completions", {**INNOCENT, "prompt": f"hello {i}"},
                              timeout=DEADLINE, stop_after=3) for i in range(4)]
    thread, innocent = in_background(stream, server.port, "/v1/completions", INNOCENT, timeout=DEADLINE)
    for t, _ in [*quitters, (thread, None)]:
        t.join(DEADLINE)
    assert innocent["value"].texts() == {0: reference(INNOCENT["prompt"])}
    deadline = time.time() + DEADLINE
    while time.time() < deadline and metric(server.port, "serve_requests_aborted_total") < aborted + 4:
        time.sleep(0.05)
    assert metric(server.port, "serve_requests_aborted_total") == aborted + 4
    assert_clean(server.port)


def test_half_a_body_is_cut_off(engine):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{\"model\": ")
    with LiveServer(engine, MODEL, limits=ServerLimits(body_timeout_s=1.0)) as live:
        reply = send_raw(live.port, head, timeout=DEADLINE)
        assert reply.status == 408 and reply.seconds < 5, (reply.status, reply.seconds, reply.error)
        assert call(live.port, "GET", "/health", timeout=5).status == 200


def test_dead_engine_loop_shows_on_health_and_refuses(model_dir, monkeypatch):
    doomed = LLMEngine(EngineConfig(model=str(model_dir), **ENGINE_ARGS))

    def broken():
        if doomed.requests:
            raise RuntimeError("injected loop fault")
        return False
    monkeypatch.setattr(doomed, "has_unfinished_requests", broken)
    with LiveServer(doomed, MODEL) as live:
        assert call(live.port, "GET", "/health", timeout=5).status == 200
        first = call(live.port, "POST", "/v1/completions", {**INNOCENT, "max_tokens": 2}, timeout=DEADLINE)
        assert first.status == 500 and first.is_openai_error()
        assert call(live.port, "GET", "/health", timeout=5).status == 503
        later = call(live.port, "POST", "/v1/completions", {**INNOCENT, "max_tokens": 2}, timeout=DEADLINE)
        assert later.status == 503 and later.is_openai_error()


DIE_ON_FIRST_REQUEST = """
import sys
from serve.config import EngineConfig
from serve.engine import LLMEngine
from serve.server import serve_forever

def broken(self):
    if self.requests:
        raise RuntimeError("injected loop fault")
    return False
LLMEngine.has_unfinished_requests = broken
serve_forever(LLMEngine(EngineConfig(model=sys.argv[1], block_size=4)), "tiny", "127.0.0.1", int(sys.argv[2]))
"""


def test_dead_engine_loop_exits_the_process_non_zero(model_dir):
    from test_server import free_port
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", DIE_ON_FIRST_REQUEST, str(model_dir), str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and call(port, "GET", "/health", timeout=2).status != 200:
            assert proc.poll() is None
            time.sleep(0.2)
        reply = call(port, "POST", "/v1/completions", {**INNOCENT, "max_tokens": 2}, timeout=DEADLINE)
        assert reply.status == 500 and reply.is_openai_error()
        assert proc.wait(timeout=DEADLINE) != 0
    finally:
        proc.kill()
    assert "injected loop fault" in proc.stdout.read()


def test_a_client_that_stops_reading_is_dropped(server, monkeypatch):
    """A stream whose client takes nothing for write_timeout_s is cut off (no [DONE], the socket closed at
    once) and its request aborted. A client that stops reading shows as a write that never completes."""
    from aiohttp import web

    from serve.context import LIMITS

    async def write_never_completes(self, data):
        await asyncio.sleep(3600)
    monkeypatch.setattr(web.StreamResponse, "write", write_never_completes)
    monkeypatch.setattr(server.app[LIMITS], "write_timeout_s", 0.5)
    got = stream(server.port, "/v1/completions", INNOCENT, timeout=DEADLINE)
    assert got.status == 200 and not got.done and got.seconds < 5, got
    assert_clean(server.port)
