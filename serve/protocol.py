"""OpenAI API requests in, validated; OpenAI-shaped responses and stream chunks out.

`parse_completion` / `parse_chat` turn a JSON body into a `ParsedRequest` or raise `ApiError` (HTTP
status + OpenAI error body). Field names and defaults follow the OpenAI API; `top_k` and `ignore_eos`
are accepted as extensions (as vLLM does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from serve.sampling_params import SamplingParams


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass
class ParsedRequest:
    model: str
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    max_tokens_given: bool = True     # chat without max_tokens may use the rest of the context


_TYPES = {"int": (int,), "number": (int, float), "bool": (bool,), "str": (str,), "list": (list,), "dict": (dict,)}


def _get(body: dict, name: str, kind: str, default=None, required: bool = False):
    if name not in body or body[name] is None:
        if required:
            raise ApiError(400, f"'{name}' is a required field", name)
        return default
    value = body[name]
    # bool is an int subclass in Python; JSON true is not a number here.
    if not isinstance(value, _TYPES[kind]) or (kind in ("int", "number") and isinstance(value, bool)):
        raise ApiError(400, f"'{name}' must be of type {kind}, got {type(value).__name__}", name)
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        return stop
    raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", "stop")


def _params(body: dict, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    try:
        return SamplingParams(
            n=_get(body, "n", "int", 1), temperature=float(_get(body, "temperature", "number", 1.0)),
            top_p=float(_get(body, "top_p", "number", 1.0)), top_k=_get(body, "top_k", "int", 0),
            max_tokens=max_tokens if max_tokens is not None else 16, stop=_stop(body),
            ignore_eos=_get(body, "ignore_eos", "bool", False), seed=_get(body, "seed", "int"), logprobs=logprobs)
    except ValueError as err:
        param = str(err).split()[0]
        raise ApiError(400, str(err), param) from None


def _common(body, max_tokens, logprobs) -> ParsedRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    options = _get(body, "stream_options", "dict", {})
    return ParsedRequest(model=_get(body, "model", "str", required=True),
                         params=_params(body, max_tokens, logprobs), stream=_get(body, "stream", "bool", False),
                         include_usage=bool(options.get("include_usage", False)))


def parse_completion(body) -> ParsedRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    request = _common(body, _get(body, "max_tokens", "int"), _get(body, "logprobs", "int"))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]        # a batch of one
    valid_ids = isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    if prompt is None:
        raise ApiError(400, "'prompt' is a required field", "prompt")
    if not (isinstance(prompt, str) or valid_ids):
        raise ApiError(400, "'prompt' must be a string or a list of token ids (one prompt per request)", "prompt")
    if len(prompt) == 0:
        raise ApiError(400, "'prompt' must not be empty", "prompt")
    request.prompt = prompt
    request.echo = _get(body, "echo", "bool", False)
    return request


def parse_chat(body) -> ParsedRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    max_tokens = _get(body, "max_completion_tokens", "int", _get(body, "max_tokens", "int"))
    top = _get(body, "top_logprobs", "int", 0)
    request = _common(body, max_tokens, top if _get(body, "logprobs", "bool", False) else None)
    messages = _get(body, "messages", "list", required=True)
    if not messages:
        raise ApiError(400, "'messages' must not be empty", "messages")
    for message in messages:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ApiError(400, "each message needs a string 'role' and a string 'content'", "messages")
    request.messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    request.max_tokens_given = max_tokens is not None
    return request
