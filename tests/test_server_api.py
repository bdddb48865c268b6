"""The OpenAI surface the server now implements, checked against the offline engine on a tiny Gemma 3:
a list of prompts in one request, the penalties, logit_bias, min_tokens and stop_token_ids, logprobs
while streaming, echo of token-id prompts, /tokenize and /detokenize, and latency histograms."""

import sys
from pathlib import Path

import pytest

from serve import LLM, LLMEngine, SamplingParams
from serve.config import EngineConfig
from serve_fixtures import gemma3_config, random_model, save_model
from server_harness import LiveServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evals.loopback import call, stream  # noqa: E402

MODEL = "tiny"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = save_model(random_model(gemma3_config(), seed=5), tmp_path_factory.mktemp("api") / MODEL)
    llm = LLM(path, block_size=4)
    with LiveServer(LLMEngine(EngineConfig(model=str(path), block_size=4)), MODEL) as live:
        yield live.port, llm


def completion(port, **fields):
    reply = call(port, "POST", "/v1/completions", {"model": MODEL, **fields})
    assert reply.status == 200, reply.body
    return reply.json()


def offline(llm, prompt, **params):
    return llm.generate(prompt, SamplingParams(**params))[0].outputs


@pytest.mark.parametrize("prompts", [["the quick brown", "hello world", "caf\u00e9"], [[5, 6, 7], [40, 41], [9] * 12]])
def test_a_list_of_prompts_equals_one_request_each(setup, prompts):
    port, llm = setup
    body = completion(port, prompt=prompts, max_tokens=6, temperature=0, n=2, ignore_eos=True)
    texts = [c["text"] for c in sorted(body["choices"], key=lambda c: c["index"])]
    expected = [offline(llm, p, temperature=0, max_tokens=6, ignore_eos=True)[0].text for p in prompts]
    assert texts == [t for t in expected for _ in range(2)]
    assert body["usage"]["completion_tokens"] == 6 * 2 * len(prompts)
    streamed = stream(port, "/v1/completions", {"model": MODEL, "prompt": prompts, "max_tokens": 6, "temperature": 0,
                                                "n": 2, "ignore_eos": True})
    assert streamed.done and streamed.texts() == dict(enumerate(texts))


SAMPLING = [dict(repetition_penalty=1.6), dict(presence_penalty=1.5, frequency_penalty=1.0),
            dict(logit_bias={"42": 100}), dict(min_tokens=5, logit_bias={"1": 100})]


@pytest.mark.parametrize("fields", SAMPLING, ids=lambda f: ",".join(f))
def test_sampling_fields_reach_the_engine(setup, fields):
    port, llm = setup
    body = completion(port, prompt="hello world", max_tokens=12, temperature=0, **fields)
    params = {k: ({int(t): b for t, b in v.items()} if k == "logit_bias" else v) for k, v in fields.items()}
    out = offline(llm, "hello world", temperature=0, max_tokens=12, **params)[0]
    assert body["choices"][0]["text"] == out.text and body["choices"][0]["finish_reason"] == out.finish_reason
    plain = offline(llm, "hello world", temperature=0, max_tokens=12)[0]
    assert out.token_ids != plain.token_ids


def test_stop_token_ids_end_the_sample(setup):
    port, llm = setup
    plain = offline(llm, "hello world", temperature=0, max_tokens=12, ignore_eos=True)[0]
    stop = plain.token_ids[3]
    cut = plain.token_ids[:plain.token_ids.index(stop) + 1]
    body = completion(port, prompt="hello world", max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[stop])
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == len(cut)


def test_logprobs_while_streaming_equal_the_full_response(setup):
    port, _ = setup
    fields = dict(prompt="the quick", max_tokens=7, temperature=0, logprobs=2, ignore_eos=True)
    full = completion(port, **fields)["choices"][0]["logprobs"]
    streamed = stream(port, "/v1/completions", {"model": MODEL, **fields})
    parts = [c["logprobs"] for e in streamed.events if isinstance(e, dict) for c in e["choices"] if c["logprobs"]]
    assert sum((p["tokens"] for p in parts), []) == full["tokens"]
    # the second request reads the prompt's KV from the prefix cache: equal up to float rounding
    assert sum((p["token_logprobs"] for p in parts), []) == pytest.approx(full["token_logprobs"], abs=1e-4)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    chat_full = call(port, "POST", "/v1/chat/completions", chat).json()["choices"][0]["logprobs"]["content"]
    chat_parts = [c["logprobs"]["content"] for e in stream(port, "/v1/chat/completions", chat).events
                  if isinstance(e, dict) for c in e["choices"] if c["logprobs"]]
    chat_streamed = sum(chat_parts, [])
    assert [e["token"] for e in chat_streamed] == [e["token"] for e in chat_full] and len(chat_full) == 5
    assert [e["logprob"] for e in chat_streamed] == pytest.approx([e["logprob"] for e in chat_full], abs=1e-4)


def test_echo_of_a_token_id_prompt(setup):
    port, llm = setup
    ids = [2, 40, 41, 42, 43]
    text = llm.engine.tokenizer.decode(ids)
    body = completion(port, prompt=ids, max_tokens=3, temperature=0, echo=True)
    assert body["choices"][0]["text"].startswith(text) and len(body["choices"][0]["text"]) > len(text)
    streamed = stream(port, "/v1/completions", {"model": MODEL, "prompt": ids, "max_tokens": 3, "temperature": 0,
                                                "echo": True})
    assert streamed.texts() == {0: body["choices"][0]["text"]}


def test_tokenize_and_detokenize_round_trip(setup):
    port, llm = setup
    got = call(port, "POST", "/tokenize", {"model": MODEL, "prompt": "hello world"}).json()
    assert got["tokens"] == llm.engine.tokenizer("hello world")["input_ids"] and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == llm.engine.max_model_len
    back = call(port, "POST", "/detokenize", {"tokens": got["tokens"]}).json()
    assert back["prompt"] == llm.engine.tokenizer.decode(got["tokens"])
    chat = call(port, "POST", "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 3


def test_latency_histograms_in_metrics(setup):
    port, _ = setup
    completion(port, prompt="hello", max_tokens=4, temperature=0, ignore_eos=True)
    text = call(port, "GET", "/metrics").body.decode()
    for name in ("serve_time_to_first_token_seconds", "serve_time_per_output_token_seconds",
                 "serve_e2e_request_latency_seconds"):
        assert f"# TYPE {name} histogram" in text
        buckets = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "_bucket")]
        count = next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "_count"))
        assert buckets == sorted(buckets) and buckets[-1] == count >= 1
