"""What the engine hands back per request after a step: the text and tokens of each of its samples."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str                      # complete characters only; a possible stop-string prefix is held back
    token_ids: list[int]
    finish_reason: str | None      # None while running; "stop", "length", "abort" or "error"
    logprobs: list[dict] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    error: str | None = None       # set (with finished) when this request failed alone; others ran on


def failure_message(err: BaseException) -> str:
    """What a client is told of an error of the server's own: its kind, never its traceback."""
    return f"the server failed on this request ({type(err).__name__}); the server log has the details"
