"""The one error-and-auth middleware of both HTTP apps (serve/server.py for decoders, serve/encoder/server.py
for encoders): a missing or wrong key is 401 where the app asks for one, an `ApiError` is its own status
with an OpenAI error body (the connection closed after it when the error says so: its body was never read
whole), aiohttp's refusals (404, 405, 413, ...) get the same body, anything else is logged and a one-line 500.
"""

from __future__ import annotations

import logging
from typing import Callable

from aiohttp import web

from serve.protocol import ApiError

log = logging.getLogger("serve")


def error_response(err: ApiError) -> web.Response:
    return web.json_response(err.body(), status=err.status)


async def _error_and_close(request: web.Request, err: ApiError) -> web.Response:
    """Answer, then drop the connection at once (aiohttp would otherwise linger to read the body)."""
    response = error_response(err)
    await response.prepare(request)
    await response.write_eof()
    if request.transport is not None:
        request.transport.close()       # after the buffered answer is flushed
    return response


def errors_and_auth(api_key: web.AppKey, needs_key: Callable[[str], bool]):
    """The middleware for an app whose key (empty: none) is `app[api_key]`, asked on paths `needs_key` names."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        key = request.app[api_key]
        try:
            if key and needs_key(request.path) and request.headers.get("Authorization") != f"Bearer {key}":
                raise ApiError(401, "missing or invalid API key", kind="authentication_error")
            return await handler(request)
        except ApiError as err:
            return await _error_and_close(request, err) if err.close else error_response(err)
        except web.HTTPException as err:    # aiohttp's own refusals (404, 405, ...): the same error body
            if err.status < 400:
                raise
            return error_response(ApiError(err.status, err.reason))
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return error_response(ApiError(500, "internal server error", kind="server_error"))

    return middleware
