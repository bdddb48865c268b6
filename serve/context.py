"""What every HTTP handler reads from the app (engine, model name, key, text worker, limits), and the
reading of a request body within those limits.

A body is refused before it is parsed when its declared length is over `max_body_bytes` (413), when
it grows past that while arriving (413), or when it has not arrived whole within `body_timeout_s`
(408, and the connection is closed: a client that declares a body and sends half of it cannot hold
a connection). Then the schema parses it (serve/protocol.py) and the model it names is checked.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web

from serve.async_engine import AsyncEngine
from serve.protocol import ApiError, parse
from serve.tokenization import TextWorker


@dataclass
class ServerLimits:
    max_body_bytes: int = 4 * 2**20      # a 32k-token prompt is well under 1 MiB of JSON
    body_timeout_s: float = 30.0         # for the whole body to arrive
    write_timeout_s: float = 60.0        # for a streaming client to take one more chunk

    def __post_init__(self):
        for name in ("max_body_bytes", "body_timeout_s", "write_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


ENGINE, TEXT = web.AppKey("engine", AsyncEngine), web.AppKey("text", TextWorker)
MODEL_NAME, API_KEY, LIMITS = web.AppKey("model", str), web.AppKey("key", str), web.AppKey("limits", ServerLimits)


async def read_body(request: web.Request) -> bytes:
    limits = request.app[LIMITS]
    if request.content_length is not None and request.content_length > limits.max_body_bytes:
        raise _too_large(limits)
    try:
        return await asyncio.wait_for(request.read(), limits.body_timeout_s)
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limits) from None
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {limits.body_timeout_s:g} s", close=True) from None


def _too_large(limits: ServerLimits) -> ApiError:
    return ApiError(413, f"the request body is larger than {limits.max_body_bytes} bytes")


async def read_request(request: web.Request, schema, model_required: bool = True):
    """The body parsed by `schema`, naming the served model (or, where it may, none)."""
    parsed = parse(schema, await read_body(request))
    served = request.app[MODEL_NAME]
    if (parsed.model is not None or model_required) and parsed.model not in (served, "default"):
        raise ApiError(400, f"model {parsed.model!r} is not served here (try {served!r})", "model")
    return parsed
