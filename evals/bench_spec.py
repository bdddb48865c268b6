"""Speculative decoding benchmark (issue 35): latency and throughput with no speculation, fixed K and `auto`.

Models: a Gemma-3-4B-shaped target and a Gemma-3-270M-shaped draft with seeded random bf16 weights
(evals/serve_models.py), the draft given the target's vocabulary. Random weights agree on nothing, so
acceptance is set by replay: the target's own greedy continuation of every prompt is computed first
(no speculation), and each token the draft proposes is replaced by that continuation's token, or with
probability 1 - acceptance by another random token; the draft model still runs every pass, so its
cost is real. Greedy, EOS ignored, prefix caching off.
Measured per mode: batch-1 time per output token; output tokens/s with 8, 32, 128, 256 requests
submitted at once; and at two Poisson request rates, tokens/s and mean time per output token.

  python evals/bench_spec.py --acceptance 0.8 --out evals/results/spec_decode.md       # GPU machine
  python evals/bench_spec.py --acceptance-from evals/results/spec_acceptance.json        # the rate measured for real
  python evals/bench_spec.py --quick --out /tmp/spec_quick.md                           # CPU smoke, tiny shapes
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_models import (
    hf_config,
    random_weights,
    synthetic_tokenizer,
    write_checkpoint,
)

QUICK = {"model_type": "gemma3_text", "vocab_size": 512, "head_dim": 16, "query_pre_attn_scalar": 16,
         "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
         "sliding_window": 16, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
QUICK_SHAPES = {"target": {**QUICK, "num_hidden_layers": 4, "intermediate_size": 128},
                "draft": {**QUICK, "num_hidden_layers": 1, "intermediate_size": 64}}

QUICK_DEFAULTS = {"batches": "2,4", "rates": "200,1000", "num_rate_requests": 6, "prompt_len": 8, "output_len": 8,
                  "max_model_len": 64, "max_num_batched_tokens": 64, "modes": "off,1,2,auto", "device": "cpu"}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="gemma-3-4b", help="shape name of evals/serve_models.py")
    p.add_argument("--draft", default="gemma-3-270m", help="shape name; given the target's vocabulary")
    p.add_argument("--acceptance", type=float, default=0.8, help="replayed acceptance rate per drafted token")
    p.add_argument("--acceptance-from", metavar="JSON",
                   help="take --acceptance from evals/spec_acceptance.py's JSON: the per-token acceptance of its best "
                        "child at --acceptance-k")
    p.add_argument("--acceptance-k", type=int, help="the K read by --acceptance-from (default: the largest measured)")
    p.add_argument("--modes", default="off,1,2,3,4,5,auto", help="off (no draft), fixed K values and auto")
    p.add_argument("--batches", default="8,32,128,256")
    p.add_argument("--rates", default="4,16", help="Poisson request rates, requests/s")
    p.add_argument("--num-rate-requests", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--workdir", default="/tmp/bench_spec")
    p.add_argument("--device", default="auto")
    p.add_argument("--fast-path", default="auto", choices=["auto", "on", "off"],
                   help="the engine's fast path (CUDA graphs on a GPU; `on` runs its eager twin on a CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny shapes on the CPU, a few requests (a smoke test)")
    p.add_argument("--out", default="evals/results/spec_decode.md", help="the table (.md) and its .json beside it")
    if "--quick" in argv:
        p.set_defaults(**QUICK_DEFAULTS)
    args = p.parse_args(argv)
    args.acceptance_source = None
    if args.acceptance_from:
        args.acceptance, args.acceptance_source = measured_acceptance(args.acceptance_from, args.acceptance_k)
    return args


def measured_acceptance(path: str, k: int | None) -> tuple[float, str]:
    """(per-token acceptance, where it came from): the best child's at K in a spec_acceptance.py JSON."""
    result = json.loads(Path(path).read_text())
    found = [(int(key), run["per_token_acceptance"], child["name"]) for child in result["children"]
             for key, run in child.get("runs", {}).items() if key.isdigit() and "per_token_acceptance" in run]
    if not found:
        raise SystemExit(f"{path} has no measured acceptance (no child was run at a fixed K)")
    k = max(f[0] for f in found) if k is None else k
    at_k = [f for f in found if f[0] == k]
    if not at_k:
        raise SystemExit(f"{path} has no run at K={k} (measured: {sorted({f[0] for f in found})})")
    _, p, name = max(at_k, key=lambda f: f[1])
    return p, (f"per-token acceptance {p} of draft {name} at K={k}, measured on {result['settings']['model']} "
               f"({result.get('device', '?')}) by `{result['command']}`, from {path}")


# ---- models -------------------------------------------------------------------------------------
def shape_config(name: str, args, vocab_size: int | None = None) -> dict:
    if args.quick:
        from transformers import Gemma3TextConfig
        fields = dict(QUICK_SHAPES[name])
        fields.pop("model_type")
        return Gemma3TextConfig(**fields).to_dict()
    config = hf_config(name)
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    return config


def build_pair(args) -> tuple[Path, Path, int]:
    """(target dir, draft dir, vocabulary size), written once under --workdir."""
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    names = ("target", "draft") if args.quick else (args.target, args.draft)
    target_config = shape_config(names[0], args)
    vocab = target_config["vocab_size"]
    tokenizer = synthetic_tokenizer(vocab)        # one object for both: the draft shares the target's tokenizer
    paths = []
    for role, name, config in (("target", names[0], target_config), ("draft", names[1], None)):
        config = config or shape_config(name, args, vocab)
        path = Path(args.workdir) / f"{role}-{name}-v{vocab}"
        if not (path / "model.safetensors").is_file():
            tensors = random_weights(config, device, seed=args.seed + len(paths))
            write_checkpoint(path, config, tensors, tokenizer)
            del tensors
        paths.append(path)
    return paths[0], paths[1], vocab


def make_llm(args, target: Path, draft: Path, mode: str):
    from serve import LLM
    config = {"max_model_len": args.max_model_len, "max_num_seqs": max(map(int, args.batches.split(","))),
              "max_num_batched_tokens": args.max_num_batched_tokens, "enable_prefix_caching": False,
              "device": args.device, "fast_path": args.fast_path}
    if mode == "off":
        return LLM(str(target), **config)
    k = mode if mode == "auto" else int(mode)
    return LLM(str(target), draft=str(draft), num_speculative_tokens=k, **config)


class Replay:
    """Replaces each drafted token by the target's greedy continuation, or by a wrong token with
    probability 1 - acceptance, once the draft's passes have run (eager or on graphs, where greedy passes
    chain on the device and the host sees the tokens only at the end). The draft's later passes still
    read its own tokens: the replay sets what the target verifies, while the draft's cost stays real."""

    def __init__(self, continuations: dict, acceptance: float, vocab: int, seed: int):
        self.continuations, self.acceptance, self.vocab = continuations, acceptance, vocab
        self.rng = random.Random(seed)

    def install(self, speculator) -> None:
        for name in ("_draft", "_draft_on_graphs"):
            self._wrap(speculator, name)

    def _wrap(self, speculator, name: str) -> None:
        passes = getattr(speculator, name)

        def replayed(spans, lengths, drafts):
            passes(spans, lengths, drafts)
            for draft in drafts.values():
                draft.tokens = [self._token(draft.seq, i) for i in range(len(draft.tokens))]
        setattr(speculator, name, replayed)

    def _token(self, seq, offset: int) -> int:
        right = self.continuations[tuple(seq.token_ids[:seq.num_prompt_tokens])]
        index = seq.num_output_tokens + offset
        wanted = right[index] if index < len(right) else 0
        if self.rng.random() < self.acceptance:
            return wanted
        return (wanted + self.rng.randrange(1, self.vocab)) % self.vocab


# ---- measurements -------------------------------------------------------------------------------
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def greedy(args):
    from serve import SamplingParams
    return SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)


def timed_generate(llm, prompts, params) -> tuple[float, int]:
    sync()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    sync()
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outputs)


def online(llm, prompts, params, rate: float, seed: int) -> tuple[float, float]:
    """Poisson arrivals at `rate`/s: (output tokens/s over the run, mean seconds per output token)."""
    rng, engine, clock = random.Random(seed), llm.engine, 0.0
    arrivals = []
    for prompt in prompts:
        clock += rng.expovariate(rate)
        arrivals.append((clock, prompt))
    start, added, finished, tokens = time.perf_counter(), {}, [], 0
    while arrivals or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while arrivals and arrivals[0][0] <= now:
            arrival, prompt = arrivals.pop(0)
            added[engine.add_request(prompt, params)] = arrival
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, arrivals[0][0] - now))
            continue
        for output in engine.step():
            if output.finished:
                count = len(output.outputs[0].token_ids)
                tokens += count
                finished.append((time.perf_counter() - start - added[output.request_id]) / count)
    return tokens / (time.perf_counter() - start), sum(finished) / len(finished)


def measure_mode(llm, args, prompts) -> dict:
    params = greedy(args)
    llm.generate(prompts[:2], params)          # warm-up
    seconds, count = timed_generate(llm, prompts[:1], params)
    row = {"batch1_ms_per_token": 1000 * seconds / count}
    for batch in map(int, args.batches.split(",")):
        seconds, count = timed_generate(llm, prompts[:batch], params)
        row[f"tok_s_batch{batch}"] = count / seconds
    for rate in map(float, args.rates.split(",")):
        tok_s, per_token = online(llm, prompts[:args.num_rate_requests], params, rate, args.seed)
        row[f"tok_s_rate{rate:g}"], row[f"ms_per_token_rate{rate:g}"] = tok_s, 1000 * per_token
    speculator = llm.engine.speculator
    if speculator is not None:
        stats = speculator.stats
        row.update(acceptance=stats.acceptance_rate, mean_accepted_length=stats.mean_accepted_length,
                   chosen={str(k): n for k, n in sorted(stats.chosen.items())},
                   graph_steps=stats.num_graph_steps, eager_steps=stats.num_eager_steps)
    return row


def make_prompts(args, vocab: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    count = max(max(map(int, args.batches.split(","))), args.num_rate_requests, 2)
    return [[rng.randrange(3, vocab) for _ in range(args.prompt_len)] for _ in range(count)]


def release(llm) -> None:
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- report -------------------------------------------------------------------------------------
def table(rows: dict, args) -> str:
    batches, rates = args.batches.split(","), [f"{float(r):g}" for r in args.rates.split(",")]
    head = (["mode", "batch-1 ms/token"] + [f"tok/s @{b}" for b in batches]
            + [f"tok/s, ms/token @{r} req/s" for r in rates] + ["acceptance", "tokens/verify", "lengths chosen"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mode, row in rows.items():
        cells = [mode, f"{row['batch1_ms_per_token']:.2f}"] + [f"{row[f'tok_s_batch{b}']:.0f}" for b in batches]
        cells += [f"{row[f'tok_s_rate{r}']:.0f}, {row[f'ms_per_token_rate{r}']:.2f}" for r in rates]
        cells += [f"{row['acceptance']:.2f}" if "acceptance" in row else "",
                  f"{row['mean_accepted_length']:.2f}" if "acceptance" in row else "",
                  " ".join(f"{k}:{n}" for k, n in row.get("chosen", {}).items())]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(rows: dict, args, argv, device: str) -> str:
    command = "python evals/bench_spec.py " + " ".join(argv)
    models = "tiny test shapes" if args.quick else f"target {args.target}, draft {args.draft} (target's vocabulary)"
    source = f" ({args.acceptance_source})" if args.acceptance_source else ""
    text = (f"`{command}`\n\n{models}; {device}; seeded random bf16 weights; acceptance {args.acceptance}{source} set by "
            f"replaying the target's greedy continuation, each drafted token corrupted with probability "
            f"{1 - args.acceptance:.2f}, the draft model run for its real cost; prompts {args.prompt_len} tokens, "
            f"{args.output_len} output tokens, greedy.\n\n{table(rows, args)}\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "device": device, "acceptance": args.acceptance,
                                                    "acceptance_source": args.acceptance_source, "rows": rows},
                                                   indent=1))
    return text


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    target, draft, vocab = build_pair(args)
    prompts = make_prompts(args, vocab)
    plain = make_llm(args, target, draft, "off")
    outputs = plain.generate(prompts, greedy(args))
    continuations = {tuple(p): o.outputs[0].token_ids for p, o in zip(prompts, outputs)}
    release(plain)
    rows = {}
    for mode in args.modes.split(","):
        llm = make_llm(args, target, draft, mode)
        if llm.engine.speculator is not None:
            Replay(continuations, args.acceptance, vocab, args.seed).install(llm.engine.speculator)
        rows[mode] = measure_mode(llm, args, prompts)
        print(mode, json.dumps(rows[mode]), flush=True)
        release(llm)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "CPU"
    print(write_report(rows, args, argv, device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
