"""The HTTP routes of an encoder (aiohttp): embeddings, classification, models, health, metrics.

Routes: POST /v1/embeddings (OpenAI), POST /classify (vLLM; sequence-classification checkpoints only),
GET /v1/models, /health, /metrics (Prometheus text). /v1/completions and /v1/chat/completions answer
400 saying why: an encoder generates nothing. Every error, ours or aiohttp's (unknown route, body too
large), goes out as an OpenAI error body; a missing or wrong key (with --api-key) is 401. Bodies are read
within the decoder server's limits (serve/context.py): over `max_body_bytes` is 413, one that has not
arrived whole within `body_timeout_s` is 408 and its connection is closed. An encoder's bodies are larger
than a decoder's (a batch of up to max_num_inputs texts or token-id lists), so its default cap is 64 MiB.
"""

from __future__ import annotations

import json

from aiohttp import web

from serve import middleware
from serve.context import LIMITS, ServerLimits, read_body
from serve.encoder.async_engine import AsyncEncoder
from serve.encoder.engine import CLASSIFY, EMBED, Encoder
from serve.encoder.protocol import classify_response, embeddings_response, parse
from serve.protocol import ApiError

ENGINE, MODEL_NAME, API_KEY = (web.AppKey("encoder", AsyncEncoder), web.AppKey("model", str),
                               web.AppKey("key", str))
OPEN_PATHS = ("/health", "/metrics")
ENCODER_LIMITS = ServerLimits(max_body_bytes=64 * 2**20)


errors_and_auth = middleware.errors_and_auth(API_KEY, lambda path: path not in OPEN_PATHS)


async def _request(request: web.Request, token_ids: bool):
    try:
        body = json.loads(await read_body(request))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    encoder = request.app[ENGINE].encoder
    parsed = parse(body, encoder.config.max_num_inputs, len(encoder.tokenizer), token_ids)
    if parsed.model not in (request.app[MODEL_NAME], "default"):
        raise ApiError(404, f"model {parsed.model!r} is not served here (try {request.app[MODEL_NAME]!r})",
                       "model", kind="model_not_found")
    try:
        ids = encoder.tokenize(parsed.inputs, parsed.truncate)
    except ValueError as err:
        raise ApiError(400, str(err), "input") from None
    encoder.metrics.requests += 1
    return parsed, ids


async def embeddings(request: web.Request):
    parsed, ids = await _request(request, token_ids=True)
    dims = request.app[ENGINE].encoder.model.hidden_size
    if parsed.dimensions not in (None, dims):
        raise ApiError(400, f"this model's embeddings have {dims} dimensions, not {parsed.dimensions}", "dimensions")
    rows = await request.app[ENGINE].submit(EMBED, ids)
    return web.json_response(embeddings_response(parsed, rows, sum(map(len, ids))))


async def classify(request: web.Request):
    encoder = request.app[ENGINE].encoder
    if not encoder.can_classify:
        raise ApiError(400, "this model has no classification head; it serves /v1/embeddings")
    parsed, ids = await _request(request, token_ids=False)
    logits = await request.app[ENGINE].submit(CLASSIFY, ids)
    return web.json_response(classify_response(parsed, logits, encoder.model.labels, sum(map(len, ids))))


async def not_generative(request: web.Request):
    raise ApiError(400, "this model is an encoder: it serves /v1/embeddings"
                        f"{' and /classify' if request.app[ENGINE].encoder.can_classify else ''}, not text generation")


async def models(request: web.Request):
    encoder = request.app[ENGINE].encoder
    card = {"id": request.app[MODEL_NAME], "object": "model", "created": 0, "owned_by": "compress",
            "max_model_len": encoder.max_model_len, "task": "classify" if encoder.can_classify else "embed"}
    return web.json_response({"object": "list", "data": [card]})


async def health(request: web.Request):
    return web.Response(text="ok")


async def metrics_page(request: web.Request):
    return web.Response(text=render_metrics(request.app[ENGINE]), content_type="text/plain")


def render_metrics(engine: AsyncEncoder) -> str:
    m = engine.encoder.metrics
    rows = [("serve_requests_total", "counter", "Requests served.", m.requests),
            ("serve_encoder_inputs_total", "counter", "Inputs encoded.", m.inputs),
            ("serve_prompt_tokens_total", "counter", "Input tokens encoded.", m.prompt_tokens),
            ("serve_encoder_padded_tokens_total", "counter", "Tokens run, padding included.", m.padded_tokens),
            ("serve_encoder_batches_total", "counter", "Forward passes run.", m.batches),
            ("serve_encoder_busy_seconds_total", "counter", "Seconds spent in forwards.", round(m.busy_seconds, 6)),
            ("serve_requests_waiting", "gauge", "Inputs waiting for a forward.", engine.num_waiting)]
    return "".join(f"# HELP {n} {h}\n# TYPE {n} {k}\n{n} {v}\n" for n, k, h, v in rows)


def build_app(encoder: Encoder, model_name: str, api_key: str | None = None,
              limits: ServerLimits | None = None) -> web.Application:
    limits = limits or ENCODER_LIMITS
    app = web.Application(middlewares=[errors_and_auth], client_max_size=limits.max_body_bytes)
    app[ENGINE], app[MODEL_NAME], app[API_KEY] = AsyncEncoder(encoder), model_name, api_key or ""
    app[LIMITS] = limits
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/classify", classify)
    app.router.add_post("/v1/completions", not_generative)
    app.router.add_post("/v1/chat/completions", not_generative)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_page)

    async def lifecycle(app):
        app[ENGINE].start()
        yield
        await app[ENGINE].stop()
    app.cleanup_ctx.append(lifecycle)
    return app


def startup_lines(encoder: Encoder, model_name: str, host: str, port: int) -> list[str]:
    model = encoder.model
    what = "embeddings and classification" if encoder.can_classify else "embeddings"
    lines = [f"serving {model_name} ({model.config.model_type} encoder{', token-pruned' if model.token_pruned else ''})"
             f" on http://{host}:{port}/v1: {what}; max_model_len {encoder.max_model_len}, "
             f"{encoder.config.max_num_batched_tokens} tokens per batch, {model.device}"]
    lines.append(f"embeddings: {model.pooling.describe()}")
    return lines


def serve_forever(encoder: Encoder, model_name: str, host: str, port: int, api_key: str | None = None,
                  limits: ServerLimits | None = None) -> None:
    """Blocks until interrupted."""
    app = build_app(encoder, model_name, api_key, limits)
    for line in startup_lines(encoder, model_name, host, port):
        print(line, flush=True)
    web.run_app(app, host=host, port=port, print=None)
