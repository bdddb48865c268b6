"""Perplexity of a causal LM on held-out text from the command line (compress.data.perplexity does the work).

`python -m evals.perplexity MODEL_DIR --text PATH [--ppl-seq-len 512] [--ppl-max-windows N] [--ppl-tail F]`
prints the result as JSON; `compress eval DIR --perplexity PATH` measures the same.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if not __package__:  # run as a file (`python evals/perplexity.py`): make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.commands._common import add_perplexity_flags  # noqa: E402
from compress.data.perplexity import measure  # noqa: E402
from compress.device import pick_device  # noqa: E402
from compress.models import checkpoint  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="model directory or name")
    add_perplexity_flags(parser, flag="--text")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if args.perplexity is None:
        parser.error("--text is required")
    path = checkpoint.resolve(args.model)
    model = checkpoint.load(path, pick_device(args.device))
    print(json.dumps(measure(model, checkpoint.load_tokenizer(path), args), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
