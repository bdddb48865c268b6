"""The OpenAI-compatible HTTP server (aiohttp): completions, chat completions, models, health, metrics.

Routes: POST /v1/completions, POST /v1/chat/completions (prompt built with the tokenizer's chat
template), streaming as server-sent events or one JSON body; GET /v1/models, /health, /metrics
(Prometheus text). Bad input gets HTTP 400 with an OpenAI error body; a missing or wrong key (when
--api-key is set) gets 401. A client that disconnects aborts its request, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web

from serve import metrics
from serve.async_engine import AsyncEngine
from serve.engine import LLMEngine
from serve.protocol import ApiError, ParsedRequest, parse_chat, parse_completion
from serve.responses import StreamState, chunk, full_response, usage

ENGINE, MODEL_NAME, API_KEY = web.AppKey("engine", AsyncEngine), web.AppKey("model", str), web.AppKey("key", str)


def _error(err: ApiError) -> web.Response:
    return web.json_response(err.body(), status=err.status)


@web.middleware
async def errors_and_auth(request: web.Request, handler):
    key = request.app[API_KEY]
    try:
        if key and request.path.startswith("/v1/") and request.headers.get("Authorization") != f"Bearer {key}":
            raise ApiError(401, "missing or invalid API key", kind="authentication_error")
        return await handler(request)
    except ApiError as err:
        return _error(err)


async def _json(request: web.Request):
    try:
        return json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None


def _prompt_ids(engine: LLMEngine, parsed: ParsedRequest) -> list[int]:
    if parsed.messages is None:
        return engine.tokenize(parsed.prompt)
    tokenizer = engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
    try:
        text = tokenizer.apply_chat_template(parsed.messages, add_generation_prompt=True, tokenize=False)
    except Exception as err:  # jinja errors (e.g. a template that rejects a role) are the client's to fix
        raise ApiError(400, f"the chat template rejected the messages: {err}", "messages") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


async def _generate(request: web.Request, kind: str) -> web.StreamResponse:
    parse = parse_completion if kind == "completion" else parse_chat
    parsed = parse(await _json(request))
    if parsed.model not in (request.app[MODEL_NAME], "default"):
        raise ApiError(400, f"model {parsed.model!r} is not served here (try {request.app[MODEL_NAME]!r})", "model")
    engine = request.app[ENGINE]
    prompt_ids = _prompt_ids(engine.engine, parsed)
    if not parsed.max_tokens_given and prompt_ids:
        parsed.params.max_tokens = max(1, engine.engine.max_model_len - len(prompt_ids))
    try:
        request_id, queue = engine.add(prompt_ids, parsed.params, "cmpl" if kind == "completion" else "chatcmpl")
    except ValueError as err:
        raise ApiError(400, str(err)) from None
    try:
        if parsed.stream:
            return await _stream(request, kind, parsed, request_id, queue)
        return await _respond(request, kind, parsed, request_id, queue)
    finally:
        engine.abort(request_id)    # no-op when finished; frees the blocks of a vanished client


async def _next(queue: asyncio.Queue):
    output = await queue.get()
    if isinstance(output, Exception):
        raise ApiError(500, f"the engine failed: {output}", kind="server_error")
    return output


async def _respond(request, kind, parsed, request_id, queue) -> web.Response:
    output = await _next(queue)
    while not output.finished:
        output = await _next(queue)
    engine = request.app[ENGINE].engine
    prefix = parsed.prompt if parsed.echo and isinstance(parsed.prompt, str) else ""
    return web.json_response(full_response(kind, request_id, parsed.model, output, engine.tokenizer, prefix))


async def _stream(request, kind, parsed, request_id, queue) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    state, tokenizer = StreamState(kind), request.app[ENGINE].engine.tokenizer
    output = None
    while output is None or not output.finished:
        output = await _next(queue)
        choices = state.deltas(output, tokenizer)
        if choices:
            await response.write(chunk(kind, request_id, parsed.model, choices))
    if parsed.include_usage:
        await response.write(chunk(kind, request_id, parsed.model, [], usage(output)))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def completions(request: web.Request):
    return await _generate(request, "completion")


async def chat_completions(request: web.Request):
    return await _generate(request, "chat")


async def not_an_encoder(request: web.Request):
    raise ApiError(400, "this model is a decoder: it generates text (/v1/completions, /v1/chat/completions); "
                        "embeddings and classification need an encoder checkpoint")


async def models(request: web.Request):
    engine = request.app[ENGINE].engine
    card = {"id": request.app[MODEL_NAME], "object": "model", "created": int(time.time()), "owned_by": "compress",
            "max_model_len": engine.max_model_len}
    return web.json_response({"object": "list", "data": [card]})


async def health(request: web.Request):
    return web.Response(text="ok")


async def metrics_page(request: web.Request):
    return web.Response(text=metrics.render(request.app[ENGINE].engine), content_type="text/plain",
                        headers={"X-Prometheus-Format": "0.0.4"})


def build_app(engine: LLMEngine, model_name: str, api_key: str | None = None) -> web.Application:
    app = web.Application(middlewares=[errors_and_auth], client_max_size=64 * 2**20)
    app[ENGINE], app[MODEL_NAME], app[API_KEY] = AsyncEngine(engine), model_name, api_key or ""
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", not_an_encoder)
    app.router.add_post("/classify", not_an_encoder)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_page)

    async def lifecycle(app):
        app[ENGINE].start()
        yield
        await app[ENGINE].stop()
    app.cleanup_ctx.append(lifecycle)
    return app


def serve_forever(engine: LLMEngine, model_name: str, host: str, port: int, api_key: str | None = None) -> None:
    """Blocks until interrupted; handler cancellation makes a client disconnect abort its request."""
    app = build_app(engine, model_name, api_key)
    print(f"serving {model_name} on http://{host}:{port}/v1 (max_model_len {engine.max_model_len})", flush=True)
    web.run_app(app, host=host, port=port, print=None, handler_cancellation=True)
