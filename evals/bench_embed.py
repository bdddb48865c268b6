"""Encoder serving throughput (issue #34): the HTTP server and the Python engine against sentence-transformers'
`encode`, for dense and slimmed MiniLM and MPNet on a mixed-length workload; classification throughput of the
dense, head/filter-pruned, token-pruned and both; latency percentiles at a fixed request rate.

Throughput depends on shapes, not on weight values, so the GPU machine needs no weights (it reaches no
network, and MPNet's are larger than what travels to it): `stage`, run where the models are, copies what
the shapes and the tokenization need (config.json with its per-layer shapes, tokenizer and pooling files,
a few hundred kB) into a folder; `run` gives every staged model seeded random weights of those shapes and
measures. Token-pruned variants use the top-k rule (keep ratios falling linearly to --keep after the last
pruning layer), whose kept tokens do not depend on the weights; what learned thresholds keep, and at what
accuracy, is in evals/results/token_pruning.md. Every variant runs in fp16 on CUDA (--dtype) on the same texts:
`--num-texts` texts of uniformly drawn lengths in [--min-tokens, --max-tokens] tokens.

  # here: stage dense models from the cache and slimmed ones from `compress prune --objective embedding`
  python evals/bench_embed.py stage -o evals/bench_embed_stage --model minilm --model mpnet-base \
      --slimmed /tmp/ep/minilm-emb-0.5-512 --slimmed /tmp/ep/mpnet-base-emb-0.5-256
  # GPU machine: one command, about 6 minutes on an H100 (the staged folder is in the repository). The image
  # lacks pydantic, which the server imports: carry its wheels (here: python -m pip download --no-deps -d .whl
  # pydantic pydantic-core annotated-types typing-inspection, for that machine's Python; .whl/ is git-ignored)
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=.:/tmp/site
  python3 evals/bench_embed.py run --stage evals/bench_embed_stage --out $OUT/embed_gpu
  # sentence-transformers is on the GPU image (6.0.1, with scikit-learn); where it is not, download its wheel
  # into .whl the same way (without it the sentence-transformers column says "skipped")
  # CPU smoke test of the whole script
  python evals/bench_embed.py run --stage evals/bench_embed_stage --out /tmp/embed_cpu --quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.nn.attention import sdpa_kernel  # noqa: E402

SHAPE_FILES = ("config.json", "prune.json", "modules.json", "sentence_bert_config.json",
               "config_sentence_transformers.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")  # a slimmed model: its parent's


def stage(args) -> None:
    """Copy the shape and tokenizer files of each model (dense, then slimmed) into `args.output`."""
    from compress.models.checkpoint import resolve

    out, index = Path(args.output), {}
    out.mkdir(parents=True, exist_ok=True)
    for dense, slim in zip(args.model, args.slimmed + [None] * len(args.model)):
        name = Path(dense).name
        index[name] = {"parent": None}
        _copy(resolve(dense), out / name, SHAPE_FILES + TOKENIZER_FILES)
        if slim:
            index[f"{name}-slim"] = {"parent": name}
            _copy(Path(slim), out / f"{name}-slim", SHAPE_FILES)
    (out / "stage.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"staged {', '.join(index)} in {out}")


def _copy(src: Path, dst: Path, names: tuple) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    if (src / "1_Pooling").is_dir():
        shutil.copytree(src / "1_Pooling", dst / "1_Pooling", dirs_exist_ok=True)


def materialize(src: Path, tokenizer: Path, dst: Path, head: bool, keep: float | None = None, seed: int = 0) -> Path:
    """A model directory of `src`'s shapes and `tokenizer`'s files with seeded random weights (a 2-label head when
    `head`; token-pruned by the top-k rule down to `keep` when given)."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    from compress.arch import get_adapter
    from compress.token_pruning import PruningSpec, TokenPruningModel, checkpoint
    from compress.token_pruning.config import topk_keep_ratios

    if not (dst / "config.json").is_file():
        torch.manual_seed(seed)
        config = AutoConfig.from_pretrained(src)
        config.architectures = None
        model = (AutoModelForSequenceClassification if head else AutoModel).from_config(config)
        get_adapter(model).resize_to_config()
        if keep is None:
            model.save_pretrained(dst)
        else:
            spec = PruningSpec("topk", [], topk_keep_ratios(keep, len(get_adapter(model).layer_modules())))
            checkpoint.save(TokenPruningModel(model, spec), None, dst, {})
        _copy(src, dst, SHAPE_FILES[2:])
        _copy(tokenizer, dst, TOKENIZER_FILES)
    return dst


def workload(tokenizer, num_texts: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    """Texts of whole vocabulary words, one token each, so text i has a drawn length in [lo, hi] tokens."""
    rng = random.Random(seed)
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.islower() and 3 <= len(w) <= 8]
    words = [w for w in sorted(words) if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1][:5000]
    return [" ".join(rng.choices(words, k=rng.randint(lo, hi) - 2)) for _ in range(num_texts)]


def _timed(fn, warm) -> float:
    warm()
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def engine_rate(encoder, kind: str, texts: list[str], tokens: int) -> dict:
    run = encoder.embed if kind == "embed" else encoder.classify
    seconds = _timed(lambda: run(texts), lambda: run(texts[:64]))
    return {"inputs_per_s": len(texts) / seconds, "tokens_per_s": tokens / seconds, "seconds": seconds}


def st_rate(path: Path, texts: list[str], tokens: int, batch_sizes, device: str) -> dict:
    """sentence-transformers' `encode` at its best batch size and attention choice (fp16 on CUDA), or why it
    did not run."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        return {"skipped": f"sentence-transformers is not installed ({err})"}
    from serve.encoder.model import SDPA_BACKENDS

    model = SentenceTransformer(str(path), device=device)
    if device.startswith("cuda"):
        model.half()
    best = None
    # its best: each batch size with PyTorch's own SDPA choice and with the engine's (no cuDNN attention)
    for size, backends in [(size, backends) for size in batch_sizes for backends in ("default", "no-cudnn")]:
        encode = lambda t, b=size: model.encode(t, batch_size=b, convert_to_tensor=True)  # noqa: E731
        with contextlib.nullcontext() if backends == "default" else sdpa_kernel(SDPA_BACKENDS):
            seconds = _timed(lambda: encode(texts), lambda: encode(texts[:64]))
        if best is None or seconds < best["seconds"]:
            best = {"inputs_per_s": len(texts) / seconds, "tokens_per_s": tokens / seconds, "seconds": seconds,
                    "batch_size": size, "attention": backends}
    return best


def bench_embeddings(args, staged: dict, work: Path, texts: dict, results: dict) -> None:
    from bench_embed_http import Server, latency, throughput
    from serve import Encoder

    for name, info in staged.items():
        family = info["parent"] or name
        path = materialize(Path(args.stage) / name, Path(args.stage) / family, work / name, head=False)
        encoder = Encoder(str(path), dtype=args.dtype, device=args.device)
        data, tokens = texts[family]
        row = results.setdefault("embed", {}).setdefault(name, {"parent": info["parent"]})
        row["engine"] = engine_rate(encoder, "embed", data, tokens)
        del encoder
        with Server(path, "--dtype", args.dtype, "--device", args.device) as url:
            row["server"] = throughput(url, data, args.clients, args.per_request)
            row["latency"] = latency(url, data, args.rate, args.duration)
        if info["parent"] is None and not args.no_st:
            row["sentence_transformers"] = st_rate(path, data, tokens, args.st_batch_sizes, args.device)
        print(name, json.dumps(row), flush=True)


def bench_classify(args, staged: dict, work: Path, texts: dict, results: dict) -> None:
    from serve import Encoder

    for name, info in staged.items():
        family = info["parent"] or name
        data, tokens = texts[family]
        for variant, keep in ((name, None), (f"{name}+topk{args.keep}", args.keep)):
            path = materialize(Path(args.stage) / name, Path(args.stage) / family, work / f"{variant}-cls", head=True,
                               keep=keep)
            encoder = Encoder(str(path), dtype=args.dtype, device=args.device)
            results.setdefault("classify", {})[variant] = {"family": family, **engine_rate(encoder, "classify",
                                                                                          data, tokens)}
            print(variant, json.dumps(results["classify"][variant]), flush=True)
            del encoder


def render(results: dict) -> str:
    meta = results["meta"]
    lines = ["# Encoder serving throughput", "", "Regenerate:", "", f"    {meta['command']}", "",
             f"{meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}, {meta['dtype']}. "
             f"{meta['num_texts']} texts of {meta['min_tokens']}-{meta['max_tokens']} tokens (uniform; in all "
             + ", ".join(f"{k} {v}" for k, v in meta["tokens"].items()) + " tokens); random weights of each model's shapes. Server: "
             f"{meta['clients']} concurrent clients, {meta['per_request']} texts a request; latency: one-text "
             f"requests at {meta['rate']} requests/s (Poisson) for {meta['duration']} s.", "",
             "| model | engine emb/s | server emb/s | server tok/s | sentence-transformers emb/s (batch, SDPA) | "
             "server / ST | server / dense parent | p50 ms | p90 ms | p99 ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    embed = results.get("embed", {})
    for name, row in embed.items():
        st = embed[row["parent"] or name].get("sentence_transformers") or {}
        st_cell = (f"{st['inputs_per_s']:.0f} ({st['batch_size']}, {st.get('attention', 'default')})"
                   if "inputs_per_s" in st else st.get("skipped", "-"))
        vs_st = f"{row['server']['inputs_per_s'] / st['inputs_per_s']:.2f}x" if "inputs_per_s" in st else "-"
        server, lat = row["server"]["inputs_per_s"], row["latency"]
        vs_parent = f"{server / embed[row['parent']]['server']['inputs_per_s']:.2f}x" if row["parent"] else "-"
        lines.append(f"| {name} | {row['engine']['inputs_per_s']:.0f} | {server:.0f} | "
                     f"{row['server']['tokens_per_s']:.0f} | {st_cell} | {vs_st} | {vs_parent} | "
                     f"{lat['p50_ms']:.1f} | {lat['p90_ms']:.1f} | {lat['p99_ms']:.1f} |")
    lines += ["", "Classification (Python engine, 2-label head): dense, head/filter-pruned (`-slim`), token-pruned "
              f"(top-k down to {meta['keep']}) and both.", "",
              "| variant | inputs/s | tokens/s | vs dense |", "|---|---|---|---|"]
    cls = results.get("classify", {})
    for name, row in cls.items():
        dense = cls[row["family"]]["inputs_per_s"]
        lines.append(f"| {name} | {row['inputs_per_s']:.0f} | {row['tokens_per_s']:.0f} | "
                     f"{row['inputs_per_s'] / dense:.2f}x |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("stage", help="copy shapes and tokenizers of the models (where the models are)")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--model", action="append", required=True, help="dense model: name or directory")
    s.add_argument("--slimmed", action="append", default=[], help="its slimmed twin, in --model order")
    r = sub.add_parser("run", help="measure (on the GPU machine)")
    r.add_argument("--stage", required=True)
    r.add_argument("--out", required=True, help="results path without suffix (.md and .json are written)")
    r.add_argument("--work", default="/tmp/bench_embed", help="where the random-weight models are written")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--dtype", default="auto", help="auto: float16 on CUDA (sentence-transformers too), float32 on CPU")
    r.add_argument("--num-texts", type=int, default=10000)
    r.add_argument("--min-tokens", type=int, default=8)
    r.add_argument("--max-tokens", type=int, default=256)
    r.add_argument("--clients", type=int, default=32)
    r.add_argument("--per-request", type=int, default=32, help="texts per HTTP request")
    r.add_argument("--rate", type=float, default=200.0, help="requests/s of the latency run")
    r.add_argument("--duration", type=float, default=10.0)
    r.add_argument("--keep", type=float, default=0.5, help="token-pruned variants: keep ratio after the last layer")
    r.add_argument("--st-batch-sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    r.add_argument("--no-st", action="store_true", help="skip sentence-transformers")
    r.add_argument("--quick", action="store_true", help="a CPU smoke test: few short texts, short runs")
    return p.parse_args(argv)


QUICK = dict(num_texts=96, min_tokens=8, max_tokens=40, clients=4, per_request=8, rate=4.0, duration=2.0,
             st_batch_sizes=[32])


def run(args) -> None:
    from compress.models.checkpoint import load_tokenizer

    if args.quick:
        vars(args).update(QUICK)
    staged = json.loads((Path(args.stage) / "stage.json").read_text())
    work = Path(args.work)
    texts = {}
    for name, info in staged.items():
        if info["parent"] is None:
            tok = load_tokenizer(Path(args.stage) / name)
            data = workload(tok, args.num_texts, args.min_tokens, args.max_tokens)
            texts[name] = (data, sum(len(ids) for ids in tok(data)["input_ids"]))
    results = {"meta": _meta(args, texts)}
    bench_embeddings(args, staged, work, texts, results)
    bench_classify(args, staged, work, texts, results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(results))
    print(f"wrote {out.with_suffix('.md')}")


def _meta(args, texts) -> dict:
    import transformers

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    return {"command": "python evals/bench_embed.py " + shlex.join(sys.argv[1:]), "device": device,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "dtype": args.dtype if args.dtype != "auto" else ("float16" if args.device.startswith("cuda") else "float32"),
            "tokens": {k: v[1] for k, v in texts.items()},
            **{k: getattr(args, k) for k in ("num_texts", "min_tokens", "max_tokens", "clients", "per_request",
                                             "rate", "duration", "keep")}}


def main(argv=None) -> int:
    args = parse_args(argv)
    stage(args) if args.command == "stage" else run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
