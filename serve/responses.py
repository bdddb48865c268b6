"""OpenAI response bodies: full completions, SSE stream chunks, usage and logprobs.

`kind` is "completion" (/v1/completions, `text`) or "chat" (/v1/chat/completions, `message`/`delta`).
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


def usage(output: RequestOutput) -> dict:
    completion = sum(len(o.token_ids) for o in output.outputs)
    prompt = len(output.prompt_token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def logprobs_body(kind: str, out: CompletionOutput, tokenizer) -> dict | None:
    if not out.logprobs:
        return None
    text = lambda t: tokenizer.decode([t])  # noqa: E731 - one token's text
    if kind == "chat":
        return {"content": [{"token": text(lp["token"]), "logprob": lp["logprob"], "bytes": None,
                             "top_logprobs": [{"token": text(t), "logprob": v, "bytes": None} for t, v in lp["top"]]}
                            for lp in out.logprobs]}
    return {"tokens": [text(lp["token"]) for lp in out.logprobs],
            "token_logprobs": [lp["logprob"] for lp in out.logprobs],
            "top_logprobs": [{text(t): v for t, v in lp["top"]} for lp in out.logprobs], "text_offset": None}


def _choice(kind: str, out: CompletionOutput, text: str, tokenizer, chunk: bool) -> dict:
    choice = {"index": out.index, "finish_reason": _finish(out.finish_reason) if (not chunk or out.finish_reason) else None,
              "logprobs": None if chunk else logprobs_body(kind, out, tokenizer)}
    if kind == "completion":
        choice["text"] = text
    elif chunk:
        choice["delta"] = {"role": "assistant", "content": text}
    else:
        choice["message"] = {"role": "assistant", "content": text}
    return choice


def full_response(kind: str, request_id: str, model: str, output: RequestOutput, tokenizer, prefix: str = "") -> dict:
    return {"id": request_id, "object": _object(kind, False), "created": int(time.time()), "model": model,
            "choices": [_choice(kind, o, prefix + o.text, tokenizer, chunk=False) for o in output.outputs],
            "usage": usage(output)}


def chunk(kind: str, request_id: str, model: str, choices: list[dict], usage_body: dict | None = None) -> bytes:
    body = {"id": request_id, "object": _object(kind, True), "created": int(time.time()), "model": model,
            "choices": choices}
    if usage_body is not None:
        body["usage"] = usage_body
    return f"data: {json.dumps(body)}\n\n".encode()


class StreamState:
    """How much of each sample's text has been sent; yields the delta choices of one engine output."""

    def __init__(self, kind: str):
        self.kind = kind
        self.sent: dict[int, int] = {}
        self.finished: set[int] = set()

    def deltas(self, output: RequestOutput, tokenizer) -> list[dict]:
        choices = []
        for out in output.outputs:
            if out.index in self.finished:
                continue
            start = self.sent.get(out.index, 0)
            text = out.text[start:]
            if not text and out.finish_reason is None:
                continue
            self.sent[out.index] = len(out.text)
            if out.finish_reason is not None:
                self.finished.add(out.index)
            choices.append(_choice(self.kind, out, text, tokenizer, chunk=True))
        return choices
