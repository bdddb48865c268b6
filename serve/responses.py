"""OpenAI response bodies: full completions, SSE stream chunks and error events, usage and logprobs.

`kind` is "completion" (/v1/completions, `text`) or "chat" (/v1/chat/completions, `message`/`delta`).
A response may gather several engine requests (a completion with a list of prompts): prompt p's sample
i is choice p * n + i, and usage sums over the prompts.
"""

from __future__ import annotations

import json
import time

from serve.outputs import CompletionOutput, RequestOutput


def _object(kind: str, chunk: bool) -> str:
    if kind == "completion":
        return "text_completion"
    return "chat.completion.chunk" if chunk else "chat.completion"


def _finish(reason: str | None) -> str | None:
    return {"abort": None}.get(reason, reason)


def usage(outputs: list[RequestOutput]) -> dict:
    completion = sum(len(o.token_ids) for output in outputs for o in output.outputs)
    prompt = sum(len(output.prompt_token_ids) for output in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def logprobs_body(kind: str, entries: list[dict], tokenizer) -> dict | None:
    """The OpenAI `logprobs` of some sampled tokens (entries: {"token", "logprob", "top"} each)."""
    if not entries:
        return None
    text = lambda t: tokenizer.decode([t])  # noqa: E731 - one token's text
    if kind == "chat":
        return {"content": [{"token": text(lp["token"]), "logprob": lp["logprob"], "bytes": None,
                             "top_logprobs": [{"token": text(t), "logprob": v, "bytes": None} for t, v in lp["top"]]}
                            for lp in entries]}
    return {"tokens": [text(lp["token"]) for lp in entries],
            "token_logprobs": [lp["logprob"] for lp in entries],
            "top_logprobs": [{text(t): v for t, v in lp["top"]} for lp in entries], "text_offset": None}


def _choice(kind: str, index: int, text: str, finish_reason: str | None, logprobs: dict | None, chunk: bool) -> dict:
    choice = {"index": index, "finish_reason": _finish(finish_reason), "logprobs": logprobs}
    if kind == "completion":
        choice["text"] = text
    elif chunk:
        choice["delta"] = {"role": "assistant", "content": text}
    else:
        choice["message"] = {"role": "assistant", "content": text}
    return choice


def full_response(kind: str, response_id: str, model: str, outputs: list[RequestOutput], tokenizer,
                  prefixes: list[str], n: int) -> dict:
    """The body of a non-streamed response; prefixes[p] is prompt p's echo ("" without echo)."""
    choices = [_choice(kind, p * n + o.index, prefix + o.text, o.finish_reason,
                       logprobs_body(kind, o.logprobs, tokenizer), chunk=False)
               for p, (output, prefix) in enumerate(zip(outputs, prefixes)) for o in output.outputs]
    return {"id": response_id, "object": _object(kind, False), "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(outputs)}


def chunk(kind: str, response_id: str, model: str, choices: list[dict], usage_body: dict | None = None) -> bytes:
    body = {"id": response_id, "object": _object(kind, True), "created": int(time.time()), "model": model,
            "choices": choices}
    if usage_body is not None:
        body["usage"] = usage_body
    return f"data: {json.dumps(body)}\n\n".encode()


def error_event(body: dict) -> bytes:
    """An OpenAI error body as a stream event (the openai client raises it), then the end of the stream."""
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()


class StreamState:
    """What has been sent of one prompt's samples; yields the delta choices of each engine output.
    Choices are numbered from `first_index`; the echo `prefix` leads each sample's first delta."""

    def __init__(self, kind: str, first_index: int = 0, prefix: str = ""):
        self.kind, self.first_index, self.prefix = kind, first_index, prefix
        self.sent: dict[int, int] = {}           # sample -> characters of text sent
        self.sent_logprobs: dict[int, int] = {}  # sample -> logprob entries sent
        self.finished: set[int] = set()

    def deltas(self, output: RequestOutput, tokenizer) -> list[dict]:
        return [choice for out in output.outputs if (choice := self._delta(out, tokenizer)) is not None]

    def _delta(self, out: CompletionOutput, tokenizer) -> dict | None:
        if out.index in self.finished:
            return None
        start = self.sent.get(out.index)
        text = out.text[start:] if start is not None else self.prefix + out.text
        if not text and out.finish_reason is None:
            return None
        self.sent[out.index] = len(out.text)
        if out.finish_reason is not None:
            self.finished.add(out.index)
        first_logprob = self.sent_logprobs.get(out.index, 0)
        self.sent_logprobs[out.index] = len(out.logprobs)
        logprobs = logprobs_body(self.kind, out.logprobs[first_logprob:], tokenizer)
        return _choice(self.kind, self.first_index + out.index, text, out.finish_reason, logprobs, chunk=True)
