"""`compress latency-table`: measure the per-layer latency table that `compress prune --latency-ms /
--speedup` budgets with, on the machine that will run the pruned model.

Only the model's shapes matter (its config.json); the weights are random. See compress.pruning.latency.
"""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("latency-table", help="time an encoder's layers against kept heads and FFN width",
                              description="Time random-weight models of the given encoder's shape with 0..H heads "
                                          "and a grid of FFN widths per layer (CUDA-graph replays on a GPU), and "
                                          "write the per-layer table `compress prune --latency-table` reads.")
    p.add_argument("--model", required=True, help="encoder: local directory (config.json is enough), offline name "
                                                  "or hub id")
    p.add_argument("-o", "--output", required=True, help="JSON file to write")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="cuda: weights and activations in this dtype (cpu is always float32)")
    p.add_argument("--width-step", type=int, default=None,
                   help="time every N filters (default: 64 on cuda, 9 widths on cpu)")
    p.add_argument("--trials", type=int, default=10, help="timings per shape (median kept)")
    p.add_argument("--replays", type=int, default=10, help="cuda: graph replays per timing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run)


def run(args) -> int:
    from compress.pruning import latency
    from compress.models import checkpoint
    from compress.errors import UserError
    from compress.device import pick_device

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    for name in ("batch_size", "seq_len", "trials", "replays"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.width_step is not None and args.width_step < 1:
        raise UserError("--width-step must be at least 1")
    device = pick_device(args.device or "auto").type
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device}: the latency table runs on cpu or cuda")
    config = checkpoint.read_config(checkpoint.resolve(args.model))
    config.num_labels = 2  # the head's size does not matter; a base model's config has none
    filters = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    widths = latency.width_grid(filters, device, args.width_step)
    table = latency.measure_table(config, args.batch_size, args.seq_len, device, args.dtype, widths,
                                  args.trials, args.replays)
    latency.save_table(table, out)
    print(format_table(table))
    print(f"  saved to {out}")
    return 0


def format_table(table) -> str:
    m = table.meta
    lines = [f"latency table: {m['model_type']} {m['layers']} x {m['heads']} heads x {m['filters']} filters on "
             f"{m['device']} ({m['dtype']}), batch {m['batch']} x {m['seq']}",
             f"  dense {m['dense_ms']:.3f} ms; outside the layers (and empty layers) {table.overhead_ms:.3f} ms; "
             f"dense minus the table's prediction {m['interaction_ms']:+.3f} ms",
             "  attention ms per layer by heads: " + ", ".join(f"{h}: {t:.4f}" for h, t in enumerate(table.attention_ms)),
             "  FFN ms per layer by width: " + ", ".join(f"{w}: {t:.4f}" for w, t in zip(table.ffn_widths, table.ffn_ms))]
    return "\n".join(lines)
