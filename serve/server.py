"""The OpenAI-compatible HTTP server (aiohttp): routes, errors, authentication, and the process's life.

Routes: POST /v1/completions and /v1/chat/completions (serve/generate.py), POST /tokenize and
/detokenize (vLLM's), GET /v1/models, /health, /metrics (Prometheus text). Every refusal is an OpenAI
error body with a 4xx status: bad input 400, a missing or wrong key (when --api-key is set) 401, an
unknown route 404, a wrong method 405, a slow body 408, a large one 413; a failure of the server's own
is a 500 with a one-line message (the traceback goes to the log, never to the client). /health answers
503 once the engine loop has died, and `serve_forever` then exits non-zero for a supervisor to restart.
"""

from __future__ import annotations

import os
import signal
import time

from aiohttp import web

from serve import metrics, middleware
from serve.async_engine import AsyncEngine
from serve.context import API_KEY, ENGINE, LIMITS, MODEL_NAME, TEXT, ServerLimits, read_request
from serve.engine import LLMEngine
from serve.generate import chat_completions, completions
from serve.protocol import ApiError, DetokenizeRequest, TokenizeRequest
from serve.tokenization import TextWorker

EXIT_ENGINE_DEAD = 3


errors_and_auth = middleware.errors_and_auth(API_KEY, lambda path: path.startswith("/v1/"))


async def not_an_encoder(request: web.Request):
    raise ApiError(400, "this model is a decoder: it generates text (/v1/completions, /v1/chat/completions); "
                        "embeddings and classification need an encoder checkpoint")


async def models(request: web.Request):
    engine = request.app[ENGINE].engine
    card = {"id": request.app[MODEL_NAME], "object": "model", "created": int(time.time()), "owned_by": "compress",
            "max_model_len": engine.max_model_len}
    return web.json_response({"object": "list", "data": [card]})


async def tokenize(request: web.Request):
    parsed = await read_request(request, TokenizeRequest, model_required=False)
    text = request.app[TEXT]
    if parsed.messages is not None:
        ids = await text.encode_chat([{"role": m.role, "content": m.text()} for m in parsed.messages],
                                     parsed.add_generation_prompt)
    else:
        ids = await text.encode(parsed.prompt, parsed.add_special_tokens)
    return web.json_response({"count": len(ids), "max_model_len": text.max_model_len, "tokens": ids})


async def detokenize(request: web.Request):
    parsed = await read_request(request, DetokenizeRequest, model_required=False)
    vocab = request.app[ENGINE].engine.runner.spec.vocab_size
    if any(t >= vocab for t in parsed.tokens):
        raise ApiError(400, f"token ids must be below {vocab}", "tokens")
    return web.json_response({"prompt": await request.app[TEXT].decode(parsed.tokens)})


async def health(request: web.Request):
    dead = request.app[ENGINE].dead
    if dead is not None:
        raise ApiError(503, f"the engine loop has died ({type(dead).__name__}); the process is exiting",
                       kind="server_error")
    return web.Response(text="ok")


async def metrics_page(request: web.Request):
    return web.Response(text=metrics.render(request.app[ENGINE].engine), content_type="text/plain",
                        headers={"X-Prometheus-Format": "0.0.4"})


def build_app(engine: LLMEngine, model_name: str, api_key: str | None = None, limits: ServerLimits | None = None,
              on_death=None) -> web.Application:
    limits = limits or ServerLimits()
    app = web.Application(middlewares=[errors_and_auth], client_max_size=limits.max_body_bytes)
    app[ENGINE], app[MODEL_NAME], app[API_KEY] = AsyncEngine(engine, on_death), model_name, api_key or ""
    app[TEXT], app[LIMITS] = TextWorker(engine.tokenizer, engine.max_model_len), limits
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_post("/v1/embeddings", not_an_encoder)
    app.router.add_post("/classify", not_an_encoder)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_page)

    async def lifecycle(app):
        app[ENGINE].start()
        yield
        await app[ENGINE].stop()
        app[TEXT].shutdown()
    app.cleanup_ctx.append(lifecycle)
    return app


def _exit_soon(err: BaseException) -> None:
    """The engine loop died: shut the server down (SIGTERM: aiohttp's graceful exit); see serve_forever."""
    signal.raise_signal(signal.SIGTERM)


def serve_forever(engine: LLMEngine, model_name: str, host: str, port: int, api_key: str | None = None,
                  limits: ServerLimits | None = None) -> None:
    """Blocks until interrupted; handler cancellation makes a client disconnect abort its request.
    Exits the process with EXIT_ENGINE_DEAD when the engine loop died."""
    app = build_app(engine, model_name, api_key, limits, on_death=_exit_soon)
    print(f"serving {model_name} on http://{host}:{port}/v1 (max_model_len {engine.max_model_len})", flush=True)
    web.run_app(app, host=host, port=port, print=None, handler_cancellation=True)
    if app[ENGINE].dead is not None:
        print(f"the engine loop died ({app[ENGINE].dead!r}); exiting with {EXIT_ENGINE_DEAD}", flush=True)
        os._exit(EXIT_ENGINE_DEAD)     # not sys.exit: a worker thread stuck in a step would hold the process
