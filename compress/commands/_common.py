"""Flags shared by the encoder commands (finetune, prune, eval)."""

from __future__ import annotations


def add_data_flags(parser) -> None:
    parser.add_argument("--data-dir", default=None,
                        help="directory with glue/<TASK>/<split>.tsv[.gz] (default: $COMPRESS_DATA_DIR, "
                             "else the `datasets` library online); bbc-news needs none")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def overrides(args, names) -> dict:
    """The flags the user gave (argparse defaults are None), keyed by config field name."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
