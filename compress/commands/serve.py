"""`compress serve`: an OpenAI-compatible HTTP server for a dense or slimmed Gemma 2 / Gemma 3 model, or for an
encoder of the BERT family (embeddings and classification, serve/encoder/)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                              description="Paged-KV serving (continuous batching, prefix caching) of Gemma 2/3; "
                                          "an encoder (BERT, DistilBERT, RoBERTa, MPNet) serves /v1/embeddings "
                                          "and, with a classification head, /classify.")
    p.add_argument("model", metavar="DIR_OR_NAME", help="model directory, offline name (gemma-3-270m) or hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--kv-cache-memory", default=None, metavar="FRACTION_OR_SIZE",
                   help="a fraction of the memory free after the weights, shared on the GPU by the KV cache, one "
                        "step's activations and the CUDA graphs (default 0.9; CPU: a quarter of free RAM, at most "
                        "2GiB), or the KV cache's exact size: 4GB (4e9 bytes), 4GiB, 512MB")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget of one engine step (default 2048; encoders: padded tokens of one forward, 16384)")
    p.add_argument("--max-num-inputs", type=int, default=2048, help="encoders: most inputs in one request")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes")
    p.add_argument("--served-model-name", default=None, help="model name clients use (default: the directory name)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--no-prefix-caching", action="store_true", help="turn prefix caching off")
    p.add_argument("--no-overlap", action="store_true",
                   help="read each decode step's tokens before launching the next (default on the GPU fast path: "
                        "step N+1 is launched while step N's tokens are read)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="split the model over N GPUs of this host, one process each (NCCL); default 1")
    p.add_argument("--enforce-eager", action="store_true", help="never capture CUDA graphs (decode runs eagerly)")
    p.add_argument("--draft", default=None, metavar="DIR_OR_NAME",
                   help="speculative decoding: a draft model sharing the target's tokenizer (e.g. its slimmed child "
                        "from `compress prune`); greedy output is unchanged, sampled output keeps its distribution")
    p.add_argument("--num-speculative-tokens", default="auto", metavar="K|auto",
                   help="tokens the draft proposes per step, 0..8 (serve/config.py MAX_SPECULATIVE_TOKENS); default "
                        "auto: chosen every step for the most tokens per second, 0 under high load")
    p.add_argument("--max-spec-graph-batch", type=int, default=None, metavar="N",
                   help="speculative steps of up to N sequences run their draft and verify passes on CUDA graphs "
                        "(default 8; 0: eagerly, e.g. when capturing them fails)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from compress.errors import UserError
    from compress.models.hub import resolve_model
    from serve.config import EngineConfig, parse_kv_cache_memory
    from serve.engine import LLMEngine
    from serve.encoder import is_encoder
    from serve.server import serve_forever

    path = resolve_model(args.model)
    name = args.served_model_name or (args.model if not Path(args.model).is_dir() else Path(path).name)
    if is_encoder(path):
        return _serve_encoder(args, path, name)
    try:
        memory = {} if args.kv_cache_memory is None else parse_kv_cache_memory(args.kv_cache_memory)
        config = EngineConfig(model=str(path), max_model_len=args.max_model_len, block_size=args.block_size,
                              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens or 2048,
                              **memory, device=args.device, dtype=args.dtype,
                              enable_prefix_caching=not args.no_prefix_caching, overlap=not args.no_overlap,
                              enforce_eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size,
                              **_speculation(args))
        engine = LLMEngine(config)
    except ValueError as err:
        raise UserError(f"cannot serve {args.model}: {err}") from None
    for line in engine.startup_report:
        print(line, flush=True)
    serve_forever(engine, name, args.host, args.port, args.api_key)
    return 0


def _speculation(args) -> dict:
    """EngineConfig fields of --draft and --num-speculative-tokens (ValueError on a bad value)."""
    from compress.models.hub import resolve_model
    from serve.config import MAX_SPECULATIVE_TOKENS

    k = args.num_speculative_tokens
    if k != "auto":
        try:
            k = int(k)
        except ValueError:
            raise ValueError(f"--num-speculative-tokens must be 'auto' or an integer in 0..{MAX_SPECULATIVE_TOKENS}, "
                             f"got {k!r}") from None
    if args.draft is None:
        if args.num_speculative_tokens != "auto" or args.max_spec_graph_batch is not None:
            raise ValueError("--num-speculative-tokens and --max-spec-graph-batch need --draft")
        return {}
    graphs = {} if args.max_spec_graph_batch is None else {"max_spec_graph_batch": args.max_spec_graph_batch}
    return {"draft": str(resolve_model(args.draft)), "num_speculative_tokens": k, **graphs}


def _serve_encoder(args, path, name: str) -> int:
    from compress.errors import UserError
    from serve.encoder import Encoder
    from serve.encoder.server import serve_forever

    try:
        encoder = Encoder(str(path), device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
                          max_num_batched_tokens=args.max_num_batched_tokens or 16384,
                          max_num_inputs=args.max_num_inputs)
    except ValueError as err:
        raise UserError(f"cannot serve {args.model}: {err}") from None
    serve_forever(encoder, name, args.host, args.port, args.api_key)
    return 0
