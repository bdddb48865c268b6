"""/v1/completions and /v1/chat/completions: one request's walk from its body to its last byte.

read and validate the body (serve/context.py, serve/protocol.py) -> tokenize off the event loop
(serve/tokenization.py) -> one engine request per prompt, all feeding one queue (serve/async_engine.py)
-> one JSON body, or an SSE stream. Whatever happens, the engine requests are aborted at the end (a
no-op for finished ones), which frees the KV blocks of a client that went away. A request that fails
in the engine gets a 500 with an OpenAI error body, or on a stream an error event and the end of the
stream; a streaming client that takes no chunk for `write_timeout_s` is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web

from serve.async_engine import AsyncEngine, EngineDead
from serve.context import ENGINE, LIMITS, TEXT, read_request
from serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from serve.responses import StreamState, chunk, error_event, full_response, usage
from serve.sampling_params import SamplingParams

log = logging.getLogger("serve")
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


async def completions(request: web.Request) -> web.StreamResponse:
    parsed = await read_request(request, CompletionRequest)
    text = request.app[TEXT]
    prompts = parsed.prompts()
    prompt_ids = [await text.encode(prompt) for prompt in prompts]
    prefixes = [""] * len(prompts)
    if parsed.echo:
        prefixes = [prompt if isinstance(prompt, str) else await text.decode(prompt) for prompt in prompts]
    return await _generate(request, "completion", parsed, prompt_ids, parsed.params, prefixes)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    parsed = await read_request(request, ChatCompletionRequest)
    prompt_ids = await request.app[TEXT].encode_chat(parsed.chat())
    params = parsed.params
    if parsed.max_output_tokens is None:        # the rest of the context
        rest = request.app[ENGINE].engine.max_model_len - len(prompt_ids)
        params = params.model_copy(update={"max_tokens": max(1, rest)})
    return await _generate(request, "chat", parsed, [prompt_ids], params, [""])


async def _generate(request, kind: str, parsed, prompt_ids: list[list[int]], params: SamplingParams,
                    prefixes: list[str]) -> web.StreamResponse:
    engine = request.app[ENGINE]
    queue: asyncio.Queue = asyncio.Queue()
    request_ids: list[str] = []
    try:
        for ids in prompt_ids:
            request_ids.append(_add(engine, ids, params, "cmpl" if kind == "completion" else "chatcmpl", queue))
        if parsed.stream:
            return await _stream(request, kind, parsed, request_ids, queue, prefixes)
        return await _respond(request, kind, parsed, request_ids, queue, prefixes)
    finally:
        for request_id in request_ids:
            engine.abort(request_id)


def _add(engine: AsyncEngine, prompt_ids: list[int], params: SamplingParams, prefix: str, queue) -> str:
    try:
        return engine.add(prompt_ids, params, prefix, queue)[0]
    except EngineDead as err:
        raise ApiError(503, str(err), kind="server_error") from None
    except ValueError as err:
        raise ApiError(400, str(err)) from None


async def _respond(request, kind, parsed, request_ids, queue, prefixes) -> web.Response:
    final = {}
    while len(final) < len(request_ids):
        output = await queue.get()
        if output.error:
            raise ApiError(500, output.error, kind="server_error")
        if output.finished:
            final[output.request_id] = output
    text = request.app[TEXT]    # decoding logprobs of long outputs is tokenizer work: off the loop
    body = await text.run(full_response, kind, request_ids[0], parsed.model, [final[i] for i in request_ids],
                          text.tokenizer, prefixes, parsed.n)
    return web.json_response(body)


async def _stream(request, kind, parsed, request_ids, queue, prefixes) -> web.StreamResponse:
    """Once the stream has started, nothing may escape as an HTTP error (it would land inside the body):
    a failure becomes an error event, a client gone or stalled a dropped connection."""
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    timeout = request.app[LIMITS].write_timeout_s
    try:
        error = await _pump(request, response, kind, parsed, request_ids, queue, prefixes)
        await _send(response, error_event(error.body()) if error else b"data: [DONE]\n\n", timeout)
        await response.write_eof()
    except (asyncio.TimeoutError, ConnectionError) as err:
        log.warning("stream %s dropped: %s", request_ids[0], type(err).__name__)
        if request.transport is not None:
            request.transport.abort()       # close() would wait to flush to a client that does not read
    except Exception:
        log.exception("stream %s failed", request_ids[0])
        with contextlib.suppress(Exception):
            await _send(response, error_event(ApiError(500, "internal server error", kind="server_error").body()),
                        timeout)
    return response


async def _pump(request, response, kind, parsed, request_ids, queue, prefixes) -> ApiError | None:
    """Send each engine output's deltas (and usage, if asked); the error that ended the stream, if any."""
    timeout, tokenizer = request.app[LIMITS].write_timeout_s, request.app[TEXT].tokenizer
    states = {rid: StreamState(kind, p * parsed.n, prefix)
              for p, (rid, prefix) in enumerate(zip(request_ids, prefixes))}
    final = {}
    while len(final) < len(request_ids):
        output = await queue.get()
        if output.error:
            return ApiError(500, output.error, kind="server_error")
        choices = states[output.request_id].deltas(output, tokenizer)
        if choices:
            await _send(response, chunk(kind, request_ids[0], parsed.model, choices), timeout)
        if output.finished:
            final[output.request_id] = output
    if parsed.include_usage:
        await _send(response, chunk(kind, request_ids[0], parsed.model, [], usage(list(final.values()))), timeout)
    return None


async def _send(response: web.StreamResponse, data: bytes, timeout: float) -> None:
    await asyncio.wait_for(response.write(data), timeout)
