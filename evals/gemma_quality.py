"""Quality of slimmed Gemmas: importance methods x FLOPs, each without training and after distillation.

For each FLOPs fraction (of the non-embedding FLOPs at --context-len) and each method, prune a copy of the
dense model (score once per method on the shared calibration windows; GQA search, rearrangement, least-squares
tuning, slimming), then distil a copy of it from the dense parent at each token budget (compress.distill, the
same windows for every run). Every model is measured on held-out text that neither calibration nor
distillation reads: the Wikipedia articles past the calibration head, and a novel (perplexity), plus top-1
agreement with the parent on the Wikipedia tail (how often it would be accepted as a greedy draft). Also:
seconds to prune and to distil, the overlap of the units kept from a second calibration draw (stability),
greedy continuations (without training and at the largest budget). Rows are written after every cell: first
every cell without training, then the distilled ones, in --flops order; `--time-limit` starts none past it.
Writes `<out>.md` and `<out>.json`.

One GPU call runs at most 10 minutes, and the cells without training alone took 7.3 of them on an H100
(2026-12-08: 17-35 s of scoring per method and draw, then ~25 s a cell, mostly least-squares tuning), so
the run splits in two stages that write one table: `--stage prune` writes every cell without training
and saves its slimmed models under --workdir; `--stage distill` (the next call, same --out and
--workdir) reads them back and adds the distilled cells.

GPU (the reported table; two calls once the model is in the cache):
  python -m evals.gemma_quality --data-dir DIR --stage prune
  python -m evals.gemma_quality --data-dir DIR --stage distill
CPU check (the real 270M at a tiny scale, minutes):
  python -m evals.gemma_quality --quick --data-dir ../shared/data --out /tmp/gemma_quality_quick
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import torch

if not __package__:  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.arch import get_adapter  # noqa: E402
from evals.gemma_pruning import (continuations, decoder_base, decoder_distill_config,  # noqa: E402
                                 device_name, heldout_sets)
from evals.gemma_quality_report import WIKI  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--data-dir", default=None, help="shared data dir with text/ (default $COMPRESS_DATA_DIR)")
    p.add_argument("--flops", type=float, nargs="+", default=[0.8, 0.5, 0.6, 0.7, 0.9], help="in running order")
    p.add_argument("--methods", nargs="+", default=["fisher-group", "activation", "fisher"])
    p.add_argument("--budgets", type=int, nargs="+", default=[200_000, 600_000], help="distillation tokens")
    p.add_argument("--num-samples", type=int, help="calibration windows (default by device)")
    p.add_argument("--seq-len", type=int, help="calibration window (default by device)")
    p.add_argument("--batch-size", type=int, help="calibration batch (default by device)")
    p.add_argument("--context-len", type=int, default=2048)
    p.add_argument("--distill-seq-len", type=int, help="default by device (compress.distill.config)")
    p.add_argument("--distill-batch-size", type=int, default=8, help="windows per step (8 x 1024 tokens: more steps "
                   "in a small budget)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--ppl-seq-len", type=int, default=512)
    p.add_argument("--ppl-max-windows", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--time-limit", type=float, default=None, help="minutes; no new cell starts past it")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="evals/results/gemma_quality")
    p.add_argument("--stage", choices=["all", "prune", "distill"], default="all",
                   help="prune: the cells without training, their models saved in --workdir; distill: the "
                        "distilled cells from those models, added to the table at --out")
    p.add_argument("--workdir", default="/tmp/gemma_quality_models", help="slimmed models between the stages")
    p.add_argument("--max-dense-perplexity", type=float, default=100.0,
                   help="stop when the dense model reads the held-out Wikipedia worse than this (gemma-3-270m: "
                        "about 14; thousands mean a broken model or tokenizer); 0: no check")
    p.add_argument("--quick", action="store_true", help="tiny scale, to check the script on a CPU")
    args = p.parse_args(argv)
    args.command = "python -m evals.gemma_quality " + " ".join(shlex.quote(a) for a in
                                                               (sys.argv[1:] if argv is None else argv))
    if args.quick:
        args.flops, args.budgets, args.num_samples, args.seq_len, args.batch_size = [0.8], [128, 256], 4, 64, 2
        args.distill_seq_len, args.distill_batch_size, args.ppl_seq_len, args.ppl_max_windows = 64, 2, 128, 2
        args.max_new_tokens = 8
    return args


class Table:
    """The run's state: shared models and data, rows so far, and where they are written."""

    def __init__(self, args):
        from compress.pruning.pipeline import Pipeline

        self.args, self.t0 = args, time.perf_counter()
        self.data_dir, self.base = decoder_base(args, context_len=args.context_len)
        self.shared = Pipeline(self.base)
        self.result = {"rows": [], "stability": [], "command": args.command, "settings": vars(args)}

    def setup(self, calibrate: bool = True) -> None:
        """Dense model, teacher copy, calibration draws, held-out sets, distillation windows, dense row
        (without `calibrate`, for the distill stage: no calibration draws, the table so far read from --out)."""
        pipe, phase = self.shared, self.shared.phases
        with phase("load"):
            self.dense, self.tokenizer, _ = pipe.family.load(pipe.config, pipe.device)
            on_gpu = pipe.device.type == "cuda"  # the teacher in bf16 there; on the CPU the dense model itself
            self.teacher = copy.deepcopy(self.dense).to(torch.bfloat16) if on_gpu else self.dense
        if not calibrate:
            self.sets = heldout_sets(self.tokenizer, self.data_dir, self.args)
            with phase("distill_windows"):
                self.windows = self._windows()
            self._read_earlier()
            return
        with phase("calibration"):
            self.calib = pipe.family.calibrate(pipe.config, self.dense, self.tokenizer, True)
            second = dataclasses.replace(pipe.config, seed=pipe.config.seed + 1)
            self.calib2 = pipe.family.calibrate(second, self.dense, self.tokenizer, True)
        self.sets = heldout_sets(self.tokenizer, self.data_dir, self.args)
        with phase("distill_windows"):
            self.windows = self._windows()
        with phase("eval_dense"):
            self.add({"method": "dense", "flops": 1.0, "tokens": 0, **self.measure(self.dense)})
        dense = self.result["rows"][0]["perplexity"][WIKI]
        if self.args.max_dense_perplexity and dense > self.args.max_dense_perplexity:
            sys.exit(f"the dense model's held-out Wikipedia perplexity is {dense:.0f}: the model or its tokenizer "
                     f"is broken (see compress.models.convert); nothing else was run")
        self.result.update(device=device_name(self.dense), calibration=self.calib.source,
                           calib_config=pipe.config.settings(), distill_text=self.windows.source,
                           distill_sampled_windows=self.windows.num_sampled)

    def _read_earlier(self) -> None:
        """The prune stage's table (rows, stability, settings) from --out, which this stage extends."""
        path = Path(self.args.out).with_suffix(".json")
        try:
            earlier = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            sys.exit(f"--stage distill extends the table of --stage prune, but {path} cannot be read ({err})")
        prune_command = earlier["command"]
        self.result.update({k: v for k, v in earlier.items() if k not in ("command", "settings", "stopped", "seconds")})
        self.result["prune_stage_seconds"] = earlier.get("seconds")
        self.result["command"] = f"{prune_command}; then {self.args.command}"

    def distill_config(self, tokens: int):
        return decoder_distill_config(self.args, self.data_dir, tokens)

    def _windows(self):
        from compress.distill.data import distill_windows, text_windows

        config = self.distill_config(max(self.args.budgets))
        return distill_windows(self.teacher, self.tokenizer, config, text_windows(self.tokenizer, config))

    def measure(self, model, with_text: bool = True) -> dict:
        from compress.distill.loss import compare

        model.eval()
        found = {name: compare(model, self.teacher, w, 4) for name, w in self.sets.items()}
        out = {"perplexity": {n: round(r["perplexity"], 3) for n, r in found.items()},
               "agreement": round(found[WIKI]["agreement"], 4), "kl": round(found[WIKI]["kl"], 4)}
        if with_text:
            out["continuations"] = continuations(model, self.tokenizer, self.args.max_new_tokens)
        return out

    def add(self, row: dict) -> None:
        self.result["rows"].append(row)
        print(json.dumps({k: row.get(k) for k in ("method", "flops", "tokens", "perplexity", "agreement")}), flush=True)
        self.write()

    def stop_before(self, what: str) -> bool:
        """True (and the reason recorded) once --time-limit has passed."""
        limit = self.args.time_limit
        if limit is None or time.perf_counter() - self.t0 <= 60 * limit:
            return False
        self.result["stopped"] = f"stopped at the time limit ({limit} min) before {what}"
        self.write()
        return True

    def write(self) -> None:
        self.result["seconds"] = round(time.perf_counter() - self.t0, 1)
        self.result["shared_seconds"] = self.shared.phases.seconds
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(self.result, indent=2) + "\n")
        from evals.gemma_quality_report import write_markdown

        write_markdown(self.result, out.with_suffix(".md"))


def score(table: Table, method: str):
    """(scores on the first draw, scores on the second, seconds of the first)."""
    from compress.pruning.pipeline import Pipeline

    pipe = Pipeline(dataclasses.replace(table.base, method=method))
    adapter, found = get_adapter(table.dense), []
    for calib in (table.calib, table.calib2):
        t0 = time.perf_counter()
        found.append(pipe.family.score(pipe.config, table.dense, adapter, calib, pipe.device, None, True, {}))
        found.append(time.perf_counter() - t0)
    return found[0], found[2], round(found[1], 1)


def prune(table: Table, method: str, flops: float, scores, scores2):
    """The slimmed model, its row (no training) and the stability of its selection."""
    from compress.pruning.pipeline import Pipeline
    from compress.pruning.slim import slim_model
    from compress.pruning.stability import kept_overlap

    config = dataclasses.replace(table.base, method=method, flops=flops)
    probe = Pipeline(dataclasses.replace(config, tune=False))
    model, pipe = copy.deepcopy(table.dense), Pipeline(config)
    adapter = get_adapter(model)
    parent, cost_model = pipe.family.parent_shape(adapter), pipe.family.cost_model(adapter, table.calib, pipe.config)
    other = probe.masks(model, adapter, table.calib2, cost_model, parent, scores=scores2)
    t0 = time.perf_counter()
    heads, filters = pipe.masks(model, adapter, table.calib, cost_model, parent, scores=scores)
    stability = {"method": method, "flops": flops, **kept_overlap((heads, filters), other)}
    slim_model(adapter, heads, filters)
    seconds = round(time.perf_counter() - t0, 1)
    shape = {"num_attention_heads_per_layer": adapter.num_heads(),
             "num_key_value_heads_per_layer": adapter.num_kv_heads(),
             "intermediate_size_per_layer": adapter.num_filters(),
             "flops_ratio": round(cost_model.flops(adapter.num_heads(), adapter.num_kv_heads(), adapter.num_filters())
                                  / cost_model.dense_flops(), 4)}
    return model, {"method": method, "flops": flops, "tokens": 0, **shape, "prune_seconds": seconds}, stability


def distill(table: Table, model, row: dict, tokens: int, with_text: bool) -> dict:
    from compress.distill.trainer import Trainer

    student = copy.deepcopy(model).to(table.shared.device)
    trainer = Trainer(table.distill_config(tokens), student, table.teacher, table.windows, progress=True)
    trainer.run()
    result = {**row, "tokens": trainer.step * trainer.config.tokens_per_step,
              "distill_seconds": round(trainer.seconds, 1),
              "distill_history": trainer.history, **table.measure(student, with_text)}
    del student, trainer
    return result


def cell_dir(args, method: str, flops: float) -> Path:
    return Path(args.workdir) / f"{method}-{flops:g}"


def save_pruned(table: Table, model, row: dict) -> None:
    from compress.models.checkpoint import save
    from compress.models.outputs import atomic_output_dir

    with atomic_output_dir(cell_dir(table.args, row["method"], row["flops"]), overwrite=True) as tmp:
        save(model, table.tokenizer, tmp)


def load_pruned(table: Table, method: str, flops: float):
    """The prune stage's slimmed model of a cell and its row (None where that stage did not reach it)."""
    import compress

    row = next((r for r in table.result["rows"] if r["method"] == method and r["flops"] == flops
                and r["tokens"] == 0), None)
    path = cell_dir(table.args, method, flops)
    if row is None or not (path / "config.json").is_file():
        return None
    model = compress.load(path).to(torch.float32).eval()
    keys = ("method", "flops", "tokens", "num_attention_heads_per_layer", "num_key_value_heads_per_layer",
            "intermediate_size_per_layer", "flops_ratio", "prune_seconds")
    return model, {k: row[k] for k in keys if k in row}


def run(args) -> dict:
    """No-training rows for every cell first, then the distilled ones, each in --flops order: under a time
    limit the table keeps the cells that matter most (the first FLOPs listed). `--stage` splits the two."""
    table = Table(args)
    table.setup(calibrate=args.stage != "distill")
    cells = [(flops, method) for flops in args.flops for method in args.methods]
    if args.stage == "distill":
        return distill_cells(table, cells, {cell: load_pruned(table, cell[1], cell[0]) for cell in cells})
    scores, pruned = {}, {}
    for method in args.methods:
        first, second, seconds = score(table, method)
        scores[method] = (first, second)
        table.result.setdefault("score_seconds", {})[method] = seconds
    for cell in cells:
        if table.stop_before(f"pruning at FLOPs {cell[0]} with {cell[1]}"):
            return table.result
        model, row, stability = prune(table, cell[1], cell[0], *scores[cell[1]])
        table.result["stability"].append(stability)
        table.add({**row, **table.measure(model)})
        if args.stage == "prune":
            save_pruned(table, model, row)
        pruned[cell] = (model.cpu(), row) if args.stage == "all" else None  # the GPU keeps only the model in use
    if args.stage == "prune":
        table.result["pruned"] = True
        table.write()
        return table.result
    return distill_cells(table, cells, pruned)


def distill_cells(table: Table, cells: list, pruned: dict) -> dict:
    args = table.args
    for (flops, method), tokens in [(cell, tokens) for cell in cells for tokens in args.budgets]:
        if pruned.get((flops, method)) is None:
            continue                     # not pruned (the prune stage stopped before it)
        if table.stop_before(f"distilling FLOPs {flops} {method} for {tokens:,} tokens"):
            return table.result
        model, row = pruned[(flops, method)]
        table.add(distill(table, model, row, tokens, with_text=tokens == max(args.budgets)))
    table.result["complete"] = all(pruned.get(cell) is not None for cell in cells)
    table.write()
    return table.result


def main(argv=None) -> int:
    args = parse_args(argv)
    run(args)
    print(f"wrote {Path(args.out).with_suffix('.md')} and {Path(args.out).with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
