"""A corpus of malformed and hostile requests for `compress serve`, each with the status it must get.

Every case but the last few must be refused with a 4xx and an OpenAI error body, while the server
keeps serving; the `valid` ones once broke the server and must now simply work (200). Names say what
the request does; `issue` points at the item of issue #33 it comes from (or "more").
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass
class Case:
    name: str
    path: str
    body: dict | None = None
    raw: bytes | None = None          # sent as it is, instead of json(body)
    expect: int = 400
    method: str = "POST"
    issue: str = "more"


def _body(model: str, **fields) -> dict:
    return {"model": model, "prompt": "hello", "max_tokens": 4, **fields}


def _raw_field(model: str, name: str, literal: str) -> bytes:
    """A body whose `name` is a JSON-ish literal json.dumps would not write (NaN, a lone surrogate)."""
    return b'{"model": "%s", "prompt": "hello", "max_tokens": 4, "%s": %s}' % (model.encode(), name.encode(),
                                                                                literal.encode())


def completion_cases(model: str, vocab_size: int, max_model_len: int, max_body_bytes: int,
                     max_num_seqs: int) -> list[Case]:
    c = "/v1/completions"
    deep = 200_000
    return [
        Case("seed 2**70", c, _body(model, seed=2**70), issue="1"),
        Case("seed -2**64", c, _body(model, seed=-2**64)),
        Case("top_k 10**20", c, _body(model, top_k=10**20, temperature=1.0), issue="2"),
        Case("n 2**70", c, _body(model, n=2**70)),
        Case("n over max_n", c, _body(model, n=1000)),
        Case("n over max_num_seqs (could never be scheduled)", c, _body(model, n=max_num_seqs + 1)),
        Case("max_tokens 2**70", c, _body(model, max_tokens=2**70)),
        Case("logprobs 10**20", c, _body(model, logprobs=10**20)),
        Case("temperature NaN", c, raw=_raw_field(model, "temperature", "NaN"), issue="4"),
        Case("temperature Infinity", c, raw=_raw_field(model, "temperature", "Infinity"), issue="4"),
        Case("temperature 1e308", c, _body(model, temperature=1e308), issue="4"),
        Case("temperature as a string", c, _body(model, temperature="1")),
        Case("top_p -0.5", c, _body(model, top_p=-0.5)),
        Case("lone surrogate in the prompt", c, raw=b'{"model": "%s", "prompt": "\\ud800"}' % model.encode(),
             issue="4"),
        Case(f"JSON nested {deep} deep", c, raw=b'{"model": "%s", "prompt": %s%s}' % (
            model.encode(), b"[" * deep, b"]" * deep), issue="4"),
        Case("truncated JSON", c, raw=b'{"model": "%s", "prompt": "hi"' % model.encode()),
        Case("body not an object", c, [1, 2]),
        Case("body over the size limit", c, _body(model, prompt="a" * (max_body_bytes + 1024)), expect=413,
             issue="3"),
        Case("prompt longer than the context can hold (not tokenized)", c,
             _body(model, prompt="word " * (max_body_bytes // 8)), issue="3"),
        Case("token id 2**70", c, _body(model, prompt=[1, 2**70])),
        Case("token id -1", c, _body(model, prompt=[1, -1])),
        Case("token id past the vocabulary", c, _body(model, prompt=[1, vocab_size])),
        Case("token-id prompt past the context", c, _body(model, prompt=[5] * max_model_len)),
        Case("mixed prompt list", c, _body(model, prompt=[1, "a"])),
        Case("too many prompts", c, _body(model, prompt=["hi"] * 1000)),
        Case("logit_bias key past the vocabulary", c, _body(model, logit_bias={str(vocab_size): 1})),
        Case("logit_bias value 1e9", c, _body(model, logit_bias={"5": 1e9})),
        Case("logit_bias with 1000 entries", c, _body(model, logit_bias={str(i): 1 for i in range(1000)})),
        Case("stop_token_ids past the vocabulary", c, _body(model, stop_token_ids=[vocab_size + 5])),
        Case("five stop strings", c, _body(model, stop=["a", "b", "c", "d", "e"])),
        Case("min_tokens over max_tokens", c, _body(model, min_tokens=10, max_tokens=4)),
        Case("presence_penalty 3", c, _body(model, presence_penalty=3)),
        Case("repetition_penalty 0", c, _body(model, repetition_penalty=0)),
        Case("best_of 3 (not implemented)", c, _body(model, best_of=3), issue="7"),
        Case("suffix (not implemented)", c, _body(model, suffix="!"), issue="7"),
        Case("echo with logprobs (not implemented)", c, _body(model, echo=True, logprobs=1), issue="7"),
        Case("unknown field", c, _body(model, frobnicate=True), issue="7"),
        Case("stream as a string", c, _body(model, stream="yes")),
        Case("unknown model", c, _body("gpt-17")),
        Case("GET on a POST route", c, None, expect=405, method="GET"),
        Case("unknown route", "/v1/engines", _body(model), expect=404),
        Case("valid: n 2 with seed 2**64-1", c, _body(model, n=2, seed=2**64 - 1, temperature=1.0), expect=200,
             issue="2"),
        Case("valid: top_k past the vocabulary", c, _body(model, top_k=vocab_size * 100, temperature=1.0),
             expect=200, issue="2"),
        Case("valid: seed -1", c, _body(model, seed=-1, temperature=1.0), expect=200),
    ]


def chat_cases(model: str) -> list[Case]:
    c = "/v1/chat/completions"

    def chat(**fields) -> dict:
        return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}
    return [
        Case("chat tools (not implemented)", c, chat(tools=[{"type": "function", "function": {"name": "f"}}]),
             issue="7"),
        Case("chat response_format json_object (not implemented)", c, chat(response_format={"type": "json_object"}),
             issue="7"),
        Case("chat image content", c, chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}])),
        Case("chat tool role", c, chat(messages=[{"role": "tool", "content": "x"}])),
        Case("chat no messages", c, chat(messages=[])),
        Case("chat top_logprobs without logprobs", c, chat(top_logprobs=2)),
        Case("chat top_logprobs 50", c, chat(logprobs=True, top_logprobs=50)),
        Case("chat seed 2**70", c, chat(seed=2**70), issue="1"),
        Case("tokenize nothing", "/tokenize", {"model": model}),
        Case("detokenize 2**70", "/detokenize", {"model": model, "tokens": [2**70]}),
        Case("detokenize past the vocabulary", "/detokenize", {"tokens": [10**6]}),
    ]


def all_cases(model: str, vocab_size: int, max_model_len: int, max_body_bytes: int, max_num_seqs: int) -> list[Case]:
    return completion_cases(model, vocab_size, max_model_len, max_body_bytes, max_num_seqs) + chat_cases(model)


def payload(case: Case) -> bytes | None:
    return case.raw if case.raw is not None else (json.dumps(case.body).encode() if case.body is not None else None)
