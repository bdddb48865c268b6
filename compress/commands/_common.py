"""Flags shared by the commands: the data directory and device (finetune, prune, eval), the perplexity
settings (`compress eval --perplexity` and `python -m evals.perplexity`)."""

from __future__ import annotations


def add_data_flags(parser) -> None:
    parser.add_argument("--data-dir", default=None,
                        help="directory with glue/<TASK>/<split>.tsv[.gz] (default: $COMPRESS_DATA_DIR, "
                             "else the `datasets` library online); bbc-news needs none")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def overrides(args, names) -> dict:
    """The flags the user gave (argparse defaults are None), keyed by config field name."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def add_perplexity_flags(parser, flag: str = "--perplexity") -> None:
    """Flags for the perplexity evaluation (shared by `compress eval` and this module's CLI)."""
    parser.add_argument(flag, dest="perplexity", metavar="PATH", default=None,
                        help="held-out text file or directory to measure perplexity on")
    parser.add_argument("--ppl-seq-len", type=int, default=512, help="window length in tokens, BOS included")
    parser.add_argument("--ppl-max-windows", type=int, default=None, help="measure at most this many windows")
    parser.add_argument("--ppl-tail", type=float, default=None,
                        help="use only the last fraction of the text's documents (e.g. 0.2 for the part calibration skipped)")
    parser.add_argument("--ppl-batch-size", type=int, default=4)
