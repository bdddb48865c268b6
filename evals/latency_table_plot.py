"""Plot latency tables (`compress latency-table` JSON): per-layer attention ms against kept heads and FFN
ms against kept filters, next to what a FLOPs-proportional cost would be (a straight line from 0 to the
full layer's time), so the steps the FLOPs model cannot see stand out.

    python evals/latency_table_plot.py evals/results/latency_table_h200_mpnet-base.json \
        evals/results/latency_table_h200_minilm.json --out evals/results/latency_table_h200.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.errors import exit_code  # noqa: E402
from compress.pruning.latency import load_table  # noqa: E402


def plot(paths: list[str], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = [load_table(p) for p in paths]
    fig, axes = plt.subplots(len(tables), 2, figsize=(11, 3.6 * len(tables)), squeeze=False)
    for (ax_h, ax_f), table in zip(axes, tables):
        m = table.meta
        name = f"{m.get('model_type')} {m.get('layers')}x{m.get('heads')}x{m.get('filters')}"
        heads = list(range(len(table.attention_ms)))
        us = [1000 * t for t in table.attention_ms]
        ax_h.plot(heads, us, marker="o", label="measured")
        ax_h.plot([0, heads[-1]], [0, us[-1]], linestyle="--", color="gray", label="proportional to FLOPs")
        ax_h.set(xlabel="kept heads", ylabel="us per layer", title=f"{name}: attention")
        us = [1000 * t for t in table.ffn_ms]
        ax_f.plot(table.ffn_widths, us, marker=".", label="measured")
        ax_f.plot([0, table.ffn_widths[-1]], [0, us[-1]], linestyle="--", color="gray", label="proportional to FLOPs")
        ax_f.set(xlabel="kept FFN filters", ylabel="us per layer", title=f"{name}: FFN")
        for ax in (ax_h, ax_f):
            ax.grid(alpha=0.3)
            ax.legend(loc="upper left")
    fig.suptitle(f"Per-layer latency on {tables[0].meta.get('device')} ({tables[0].meta.get('dtype')}, batch "
                 f"{tables[0].meta.get('batch')} x {tables[0].meta.get('seq')}); outside the layers: "
                 + ", ".join(f"{t.meta.get('model_type')} {1000 * t.overhead_ms:.0f} us" for t in tables))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tables", nargs="+", help="latency table JSON files")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    return exit_code("latency_table_plot", lambda: print(f"wrote {plot(args.tables, Path(args.out))}"))


if __name__ == "__main__":
    sys.exit(main())
