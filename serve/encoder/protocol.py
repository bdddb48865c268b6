"""Encoder requests in, validated; response bodies out.

`POST /v1/embeddings` follows the OpenAI schema: `input` is a string, a list of strings, a list of token
ids or a list of such lists; `encoding_format` is `float` or `base64` (little-endian float32, what the
`openai` client asks for by default); `dimensions`, when given, must be the model's; `truncate` (an
extension, as in text-embeddings-inference) cuts inputs past the model's limit instead of refusing them.
`POST /classify` follows vLLM: `input` a string or a list of strings; each result has the label, the
class probabilities and `num_classes`, and a regression head's result its `score`. Bad input raises
`ApiError` (HTTP 400 and an OpenAI error body).
"""

from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass

import torch

from serve.protocol import ApiError

ENCODING_FORMATS = ("float", "base64")


@dataclass
class EncodeRequest:
    model: str
    inputs: list  # strings, or lists of token ids
    truncate: bool = False
    encoding_format: str = "float"
    dimensions: int | None = None


def parse(body, max_inputs: int, vocab_size: int, token_ids: bool = True) -> EncodeRequest:
    """An embeddings (`token_ids` allowed) or classify request, checked field by field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = _field(body, "model", str, required=True)
    inputs = _inputs(body.get("input"), max_inputs, vocab_size, token_ids)
    fmt = _field(body, "encoding_format", str, "float")
    if fmt not in ENCODING_FORMATS:
        raise ApiError(400, f"'encoding_format' must be one of {', '.join(ENCODING_FORMATS)}, got {fmt!r}",
                       "encoding_format")
    return EncodeRequest(model, inputs, _field(body, "truncate", bool, False), fmt, _field(body, "dimensions", int))


def _field(body: dict, name: str, kind: type, default=None, required: bool = False):
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"'{name}' is a required field", name)
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ApiError(400, f"'{name}' must be of type {kind.__name__}, got {type(value).__name__}", name)
    return value


def _inputs(value, max_inputs: int, vocab_size: int, token_ids: bool) -> list:
    if value is None:
        raise ApiError(400, "'input' is a required field", "input")
    if isinstance(value, str) or (token_ids and _is_ids(value) and value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'input' must be a string or a non-empty list", "input")
    if len(value) > max_inputs:
        raise ApiError(400, f"'input' has {len(value)} items; at most {max_inputs} per request", "input")
    for i, item in enumerate(value):
        _check_item(i, item, vocab_size, token_ids)
    return value


def _check_item(i: int, item, vocab_size: int, token_ids: bool) -> None:
    if isinstance(item, str):
        if not item.strip():
            raise ApiError(400, f"input[{i}] is empty or only whitespace", "input")
        return
    if not (token_ids and _is_ids(item)):
        kinds = "a string or a list of token ids" if token_ids else "a string"
        raise ApiError(400, f"input[{i}] must be {kinds}, got {type(item).__name__}", "input")
    if not item:
        raise ApiError(400, f"input[{i}] is an empty list of token ids", "input")
    if any(not 0 <= t < vocab_size for t in item):
        raise ApiError(400, f"input[{i}] has token ids outside the vocabulary [0, {vocab_size})", "input")


def _is_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def embeddings_response(request: EncodeRequest, rows: torch.Tensor, num_tokens: int) -> dict:
    data = [{"object": "embedding", "index": i, "embedding": _encode(row, request.encoding_format)}
            for i, row in enumerate(rows)]
    return {"object": "list", "data": data, "model": request.model,
            "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}}


def _encode(row: torch.Tensor, fmt: str):
    if fmt == "base64":
        return base64.b64encode(row.float().numpy().astype("<f4").tobytes()).decode()
    return row.float().tolist()


def classify_response(request: EncodeRequest, logits: torch.Tensor, labels: list[str], num_tokens: int) -> dict:
    regression = logits.shape[-1] == 1
    probs = logits.softmax(-1)
    data = [{"index": i, "label": None if regression else labels[int(p.argmax())],
             "probs": None if regression else p.tolist(), "num_classes": logits.shape[-1],
             **({"score": float(row[0])} if regression else {})} for i, (row, p) in enumerate(zip(logits, probs))]
    return {"id": f"classify-{uuid.uuid4().hex[:16]}", "object": "list", "created": int(time.time()),
            "model": request.model, "data": data,
            "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens, "completion_tokens": 0}}
