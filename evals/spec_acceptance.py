"""Speculative-decoding acceptance for real (issue 35): gemma-3-270m drafted by its own slimmed, distilled children.

Children (--children): `drop:N` removes N whole layers by --depth-method (compress.pruning.depth), `flops:F`
keeps a fraction F of the non-embedding FLOPs by `--width-method` (GQA search, tuning); each is pruned from the
dense parent on the shared calibration windows, distilled from it for --distill-tokens tokens (KL, the same
windows for every child; bf16 teacher on the GPU) and saved slimmed under --workdir. Top-1 agreement with the
parent on held-out Wikipedia windows is measured before and after distillation. Then the runtime serves the real
parent with each child as its draft (`LLM(target, draft=child, num_speculative_tokens=K)` for K in --ks) and once
without one, greedy with EOS ignored, on --num-prompts prompts of --prompt-len tokens cut from the held-out
Wikipedia articles (past the calibration and distillation head), --output-len tokens each: acceptance rate, mean
accepted length, the per-token acceptance those imply (bench_spec.py's replay rate), draft and verify seconds,
wall time per output token all prompts at once and one prompt at a time (--timing-prompts), and whether each
greedy output equals the no-draft output (on the GPU bf16 verify passes may differ from decode steps: reported).
Writes `<out>.md` and `<out>.json` after every stage.

GPU (about 5 minutes on one H100 once the model is in the cache; distillation 400k tokens per child):
  python -m evals.spec_acceptance --data-dir DIR
CPU check (the real 270M at a tiny scale, a few minutes):
  python -m evals.spec_acceptance --quick --data-dir ../shared/data --out /tmp/spec_acceptance_quick
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import shlex
import sys
import time
from pathlib import Path

import torch

if not __package__:  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.arch import get_adapter  # noqa: E402
from evals.gemma_pruning import decoder_base, decoder_distill_config, device_name  # noqa: E402
from evals.spec_acceptance_report import write_markdown  # noqa: E402


QUICK = {"children": ["drop:9", "flops:0.5"], "depth_method": "block-influence", "ks": ["2"], "num_samples": 4, "seq_len": 64, "batch_size": 2,
         "distill_seq_len": 64, "distill_batch_size": 2, "eval_seq_len": 128, "eval_windows": 2, "num_prompts": 4,
         "prompt_len": 32, "output_len": 16, "timing_prompts": 1}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--data-dir", default=None, help="shared data dir with text/ (default $COMPRESS_DATA_DIR)")
    p.add_argument("--children", nargs="+", default=["drop:9", "drop:12", "flops:0.5"],
                   help="drop:N (remove N layers) or flops:F (keep FLOPs fraction F, --width-method)")
    p.add_argument("--width-method", default="fisher-group")
    p.add_argument("--depth-method", default="greedy-kl", help="greedy-kl or block-influence (compress.pruning.depth)")
    p.add_argument("--ks", nargs="+", default=["2", "4"], help="draft lengths (integers or auto)")
    p.add_argument("--num-samples", type=int, default=32, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="calibration window")
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch")
    p.add_argument("--distill-tokens", type=int, help="per child (default 400,000 on a GPU, 256 on a CPU)")
    p.add_argument("--distill-seq-len", type=int, help="default by device (compress.distill.config)")
    p.add_argument("--distill-batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval-seq-len", type=int, default=512, help="held-out windows for agreement")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128, help="tokens, BOS included")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--timing-prompts", type=int, default=4, help="prompts generated one at a time for batch-1 timing")
    p.add_argument("--device", default="auto")
    p.add_argument("--workdir", default="/tmp/spec_acceptance", help="where the children are saved")
    p.add_argument("--out", default="evals/results/spec_acceptance")
    p.add_argument("--quick", action="store_true", help="tiny scale, to check the script on a CPU")
    argv = sys.argv[1:] if argv is None else argv
    if "--quick" in argv:  # flags given with it still win
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    args.command = "python -m evals.spec_acceptance " + " ".join(shlex.quote(a) for a in argv)
    if args.distill_tokens is None:
        from compress.device import pick_device

        args.distill_tokens = 400_000 if pick_device(args.device).type == "cuda" else 256
    return args


def child_settings(spec: str, args) -> dict:
    """PruneConfig fields of one --children entry."""
    kind, _, value = spec.partition(":")
    if kind == "drop":
        return {"drop_layers": int(value), "flops": None, "method": args.depth_method}
    if kind == "flops":
        return {"flops": float(value), "method": args.width_method}
    raise SystemExit(f"--children: {spec!r} is neither drop:N nor flops:F")


def per_token_acceptance(rate: float, k: float) -> float:
    """The p at which drafts accepted independently per token (each with probability p, up to the first miss)
    give `rate` accepted per drafted token at length k: solves p (1 - p^k) / ((1 - p) k) = rate."""
    def rate_at(p: float) -> float:
        return p * (1 - p ** k) / ((1 - p) * k) if p < 1 else 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rate_at(mid) < rate else (lo, mid)
    return round((lo + hi) / 2, 4)


class Run:
    """The run's state: the parent, shared calibration, distillation windows, prompts, and the result so far."""

    def __init__(self, args):
        from compress.pruning.pipeline import Pipeline

        self.args, self.t0 = args, time.perf_counter()
        self.data_dir, self.base = decoder_base(args)
        self.pipe = Pipeline(self.base)
        self.result = {"command": args.command, "settings": vars(args), "progress": [], "children": []}

    def stage(self, line: str) -> None:
        entry = f"[{time.perf_counter() - self.t0:7.1f} s] {line}"
        print(entry, flush=True)
        self.result["progress"].append(entry)
        self.write()

    def write(self) -> None:
        self.result["seconds"] = round(time.perf_counter() - self.t0, 1)
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(self.result, indent=1) + "\n")
        write_markdown(self.result, out.with_suffix(".md"))

    def setup(self) -> None:
        from compress.distill.data import distill_windows, text_windows

        pipe = self.pipe
        self.dense, self.tokenizer, self.target_dir = pipe.family.load(pipe.config, pipe.device)  # the runtime's target
        self.teacher = copy.deepcopy(self.dense).to(torch.bfloat16) if pipe.device.type == "cuda" else self.dense
        self.stage(f"loaded {self.args.model} on {pipe.device}")
        self.calib = pipe.family.calibrate(pipe.config, self.dense, self.tokenizer, True)
        config = self.distill_config()
        self.windows = distill_windows(self.teacher, self.tokenizer, config, text_windows(self.tokenizer, config))
        self.heldout, self.prompts = heldout(self.tokenizer, self.data_dir, self.args)
        self.result.update(device=device_name(pipe.device), calibration=self.calib.source,
                           distill_text=self.windows.source, target=shape(self.dense))
        self.stage(f"calibration ({self.calib.source}), {len(self.windows.train)} distillation windows, "
                   f"{len(self.prompts)} held-out prompts")

    def distill_config(self):
        return decoder_distill_config(self.args, self.data_dir, self.args.distill_tokens)

    def agreement(self, model) -> dict:
        from compress.distill.loss import compare

        model.eval()
        found = compare(model, self.teacher, self.heldout, 4)
        return {k: round(found[k], 4) for k in ("agreement", "kl", "perplexity")}


def heldout(tokenizer, data_dir: Path, args) -> tuple[torch.Tensor, list[list[int]]]:
    """(windows for agreement, prompts): both from the Wikipedia articles past the calibration head, the prompts
    after the windows."""
    from compress.data.calib import CALIB_FRACTION, bos_token_id
    from compress.data.perplexity import heldout_ids, make_windows

    ids = heldout_ids(tokenizer, data_dir / "text" / "wikipedia_sample.txt.gz", tail=1 - CALIB_FRACTION)
    bos, used = bos_token_id(tokenizer), args.eval_windows * (args.eval_seq_len - 1)
    windows = make_windows(ids, bos, args.eval_seq_len, args.eval_windows)
    prompts = make_windows(ids[used:], bos, args.prompt_len, args.num_prompts)
    if len(prompts) < args.num_prompts:
        raise SystemExit(f"the held-out text has room for {len(prompts)} prompts, fewer than --num-prompts")
    return windows, prompts.tolist()


def shape(model) -> dict:
    """Layers with any units, heads, kv heads, filters and parameter counts of a (slimmed) decoder."""
    adapter = get_adapter(model)
    heads, kv, filters = adapter.num_heads(), adapter.num_kv_heads(), adapter.num_filters()
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return {"layers": sum(1 for h, f in zip(heads, filters) if h or f), "heads": sum(heads), "kv_heads": sum(kv),
            "filters": sum(filters), "params": total, "non_embedding_params": total - embedding,
            "num_attention_heads_per_layer": heads, "intermediate_size_per_layer": filters}


def make_child(run: Run, spec: str) -> dict:
    """Prune, distil and save one child; its row (shape, agreement before and after distillation, seconds)."""
    from compress.distill.trainer import Trainer
    from compress.models import checkpoint
    from compress.pruning.pipeline import Pipeline
    from compress.pruning.slim import slim_model

    pipe = Pipeline(dataclasses.replace(run.base, **child_settings(spec, run.args)))
    model = copy.deepcopy(run.dense)
    adapter, t0 = get_adapter(model), time.perf_counter()
    parent, cost = pipe.family.parent_shape(adapter), pipe.family.cost_model(adapter, run.calib, pipe.config)
    slim_model(adapter, *pipe.masks(model, adapter, run.calib, cost, parent))
    row = {"name": spec, "method": pipe.config.method, "prune_seconds": round(time.perf_counter() - t0, 1),
           **{k: pipe.record[k] for k in ("dropped_layers", "block_influence", "greedy_kl") if k in pipe.record},
           **shape(model), "pruned": run.agreement(model)}
    run.stage(f"{spec}: pruned to {row['layers']} layers, {row['heads']} heads, {row['filters']} filters; "
              f"agreement {row['pruned']['agreement']:.1%}")
    trainer = Trainer(run.distill_config(), model.to(run.pipe.device), run.teacher, run.windows, progress=True)
    trainer.run()
    row.update(distill_tokens=trainer.step * trainer.config.tokens_per_step, distill_seconds=round(trainer.seconds, 1),
               distilled=run.agreement(model), dir=str(Path(run.args.workdir) / spec.replace(":", "-")))
    checkpoint.save(model.cpu().eval(), run.tokenizer, Path(row["dir"]), {"child": spec, "parent": run.args.model})
    run.stage(f"{spec}: distilled {row['distill_tokens']:,} tokens in {row['distill_seconds']} s, agreement "
              f"{row['distilled']['agreement']:.1%}; saved to {row['dir']}")
    del model, trainer
    return row


# ---- the runtime ----------------------------------------------------------------------------------
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_passes(speculator) -> dict:
    """Seconds spent in the speculator's draft passes and verify passes (each ends with a device sync)."""
    spent = {"draft": 0.0, "verify": 0.0}
    for name, key in (("_propose", "draft"), ("_verify", "verify")):
        original = getattr(speculator, name, None)
        if original is None:  # timed only where the speculator has these passes
            spent[key] = None
            continue

        def timed(*a, _original=original, _key=key, **kw):
            start = time.perf_counter()
            out = _original(*a, **kw)
            spent[_key] += time.perf_counter() - start
            return out
        setattr(speculator, name, timed)
    return spent


def serve_run(run: Run, draft: str | None, k) -> tuple[dict, list[list[int]]]:
    """One runtime configuration: (its row, the greedy outputs of all prompts generated at once)."""
    from serve import LLM, SamplingParams

    a = run.args
    options = {"draft": draft, "num_speculative_tokens": k} if draft else {}
    llm = LLM(str(run.target_dir), max_model_len=a.prompt_len + a.output_len + 16, max_num_seqs=a.num_prompts,
              enable_prefix_caching=False, device=a.device, **options)
    params = SamplingParams(temperature=0, max_tokens=a.output_len, ignore_eos=True)
    llm.generate(run.prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    speculator = llm.engine.speculator
    if speculator is not None:
        speculator.stats = type(speculator.stats)()
    spent = time_passes(speculator) if speculator is not None else None
    seconds, outputs = timed_generate(llm, run.prompts, params)
    tokens = [o.outputs[0].token_ids for o in outputs]
    row = {"batch_ms_per_token": round(1000 * seconds / sum(map(len, tokens)), 3)}
    if speculator is not None:
        stats = speculator.stats
        row.update(acceptance=round(stats.acceptance_rate, 4), mean_accepted_length=round(stats.mean_accepted_length, 3),
                   chosen={str(n): c for n, c in sorted(stats.chosen.items())}, **per_token(spent, tokens, "batch"))
        if k != "auto":
            row["per_token_acceptance"] = per_token_acceptance(stats.acceptance_rate, int(k))
    one = [timed_generate(llm, [p], params) for p in run.prompts[:a.timing_prompts]]
    one_tokens = [o[1][0].outputs[0].token_ids for o in one]
    row["batch1_ms_per_token"] = round(1000 * sum(s for s, _ in one) / sum(map(len, one_tokens)), 3)
    if speculator is not None:
        row.update(per_token(spent, one_tokens, "batch1"))
    llm.close()
    del llm, speculator
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row, tokens


def per_token(spent: dict, tokens: list[list[int]], prefix: str) -> dict:
    """Draft and verify milliseconds per output token since the last call (the counters restart)."""
    count, found = sum(map(len, tokens)), {}
    for key, seconds in spent.items():
        found[f"{prefix}_{key}_ms_per_token"] = None if seconds is None else round(1000 * seconds / count, 3)
        spent[key] = None if seconds is None else 0.0
    return found


def timed_generate(llm, prompts, params):
    sync()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    sync()
    return time.perf_counter() - start, outputs


def compare_outputs(tokens: list[list[int]], reference: list[list[int]]) -> dict:
    """How many greedy outputs equal the no-draft ones, and where the others first differ."""
    first = [next((i for i, (x, y) in enumerate(zip(t, r)) if x != y), min(len(t), len(r)))
             for t, r in zip(tokens, reference) if t != r]
    return {"equal": len(tokens) - len(first), "of": len(tokens), "first_differences": first}


def run_all(args) -> dict:
    run = Run(args)
    run.setup()
    for spec in args.children:
        run.result["children"].append(make_child(run, spec))
        run.write()
    run.dense = run.teacher = run.windows = None  # the GPU keeps only what the runtime needs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    run.result["no_draft"], reference = serve_run(run, None, 0)
    run.stage(f"no draft: {run.result['no_draft']['batch1_ms_per_token']} ms/token at batch 1")
    for child in run.result["children"]:
        child["runs"] = {}
        for k in args.ks:
            k = k if k == "auto" else int(k)
            row, tokens = serve_run(run, child["dir"], k)
            child["runs"][str(k)] = {**row, "greedy": compare_outputs(tokens, reference)}
            run.stage(f"{child['name']} K={k}: acceptance {row['acceptance']:.1%}, {row['mean_accepted_length']:.2f} "
                      f"tokens per verify, {row['batch1_ms_per_token']} ms/token at batch 1")
    run.result["complete"] = True
    run.write()
    return run.result


def main(argv=None) -> int:
    args = parse_args(argv)
    run_all(args)
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
