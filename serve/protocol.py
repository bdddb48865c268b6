"""OpenAI API requests in, validated: the one place that says what a request may hold.

`parse(Schema, body_bytes)` returns a `CompletionRequest`, `ChatCompletionRequest`, `TokenizeRequest` or
`DetokenizeRequest`, or raises `ApiError` (HTTP status + OpenAI error body). Pydantic parses the JSON
itself: nesting past its recursion limit, lone surrogates and NaN/Infinity are invalid JSON. Unknown
fields are refused with 400 rather than ignored, so a client never believes a field it sent had an
effect: `suffix`, `tools`, `tool_choice`, `functions`, `min_p` and the like are simply not declared.
Sampling fields and their ranges come from serve/sampling_params.py; beyond OpenAI's, vLLM's top_k,
min_tokens, repetition_penalty, stop_token_ids, ignore_eos and skip_special_tokens are accepted, and this
runtime's max_speculative_tokens (with a draft model: a per-request cap on drafted tokens per step).
What needs the model (token ids in the vocabulary, the context length, `n` against max_n) is checked by
the engine (LLMEngine.check_request).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, WrapValidator, model_validator
from pydantic_core import PydanticCustomError

from serve.sampling_params import INT32_MAX, Logprobs, MaxTokens, SamplingFields, SamplingParams, TokenId

MAX_PROMPTS = 64     # prompts in one completion request


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 close: bool = False):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.close = close      # drop the connection after answering (its body was never read whole)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _prompt_shape(value, handler):
    try:
        return handler(value)
    except ValidationError:
        raise PydanticCustomError("prompt", f"must be a non-empty string or list of token ids, or a list of at most "
                                            f"{MAX_PROMPTS} of those") from None


Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Prompt = Annotated[Text | TokenIds | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)]
                   | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)],
                   WrapValidator(_prompt_shape)]


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generate(SamplingFields):
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None      # OpenAI's end-user id for abuse monitoring: accepted, nothing to do here
    _params: SamplingParams = PrivateAttr()

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _build(self, max_tokens: int, logprobs: int | None) -> None:
        fields = self.model_dump(include=set(SamplingFields.model_fields))
        self._params = SamplingParams(**fields, max_tokens=max_tokens, logprobs=logprobs)

    @property
    def params(self) -> SamplingParams:
        return self._params


class CompletionRequest(_Generate):
    prompt: Prompt
    max_tokens: MaxTokens | None = 16
    logprobs: Logprobs | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None

    @model_validator(mode="after")
    def _check(self) -> "CompletionRequest":
        if self.best_of not in (None, self.n):
            raise ValueError("best_of other than n is not supported (no server-side ranking of samples)")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported (no prompt log-probabilities)")
        self._build(16 if self.max_tokens is None else self.max_tokens, self.logprobs)
        return self

    def prompts(self) -> list[str | list[int]]:
        """One prompt (a string or token ids) per engine request."""
        prompt = self.prompt
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            return [prompt]
        return list(prompt)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(_Strict):
    type: Literal["text"]        # what this server produces anyway; json_object / json_schema are refused


class ChatCompletionRequest(_Generate):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: Logprobs | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _check(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        # without a limit: the rest of the context, once the prompt's length is known
        self._build(self.max_output_tokens or INT32_MAX, (self.top_logprobs or 0) if self.logprobs else None)
        return self

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the chat template."""
    model: str | None = None
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: Annotated[list[TokenId], Field(max_length=2**20)]


def parse(schema: type[BaseModel], body: bytes):
    try:
        return schema.model_validate_json(body)
    except ValidationError as err:
        raise ApiError(400, *_describe(_most_telling(err.errors()))) from None


def _is_tag(part) -> bool:
    """A union member's or a dict key's place in pydantic's error location, not a field name."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def _most_telling(errors: list[dict]) -> dict:
    """For a value of a union type, the member that was meant: not the one whose type did not match."""
    meant = [e for e in errors if not (e["type"].endswith("_type") and e["loc"] and _is_tag(e["loc"][-1]))]
    return (meant or errors)[0]


def _describe(error: dict) -> tuple[str, str | None]:
    """(message, param) of a pydantic error, in the words of an API error."""
    param = ".".join(str(part) for part in error["loc"] if not _is_tag(part)) or None
    kind = error["type"]
    if kind == "json_invalid":
        return f"the request body is not valid JSON: {error['msg'].removeprefix('Invalid JSON: ')}", None
    if kind == "model_type" and param is None:
        return "the request body must be a JSON object", None
    if kind == "extra_forbidden":
        return f"'{param}' is not supported by this server", param
    if kind == "missing":
        return f"'{param}' is a required field", param
    message = error["msg"].removeprefix("Value error, ")
    return (f"'{param}': {message}" if param else message), param
