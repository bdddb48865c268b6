"""Perplexity of a causal LM over windows of held-out text, each window starting with BOS.

The text is cut into consecutive non-overlapping windows of `seq_len` tokens: BOS followed by
`seq_len - 1` text tokens; every text token is predicted once, from the tokens before it in its
window (so perplexity is comparable across models only at the same `seq_len`). Perplexity is
`exp(total NLL / number of predicted tokens)`.

Held-out text: any file or directory (`compress.calib.read_text`); `--ppl-tail F` keeps only the
last fraction F of its documents, e.g. the Wikipedia articles that calibration did not use.

CLI: `python -m evals.perplexity MODEL_DIR --text PATH [--seq-len 512] [--max-windows N]`;
`compress eval DIR --perplexity PATH` calls `main_args(parser)` and `run_args(model, tok, args)`.
"""

from __future__ import annotations

import argparse
import json
import math

# torch is imported inside the functions: `compress --help` registers this module's flags.


def add_args(parser: argparse.ArgumentParser, flag: str = "--perplexity") -> None:
    """Flags for the perplexity evaluation (shared by `compress eval` and this module's CLI)."""
    parser.add_argument(flag, dest="perplexity", metavar="PATH", default=None,
                        help="held-out text file or directory to measure perplexity on")
    parser.add_argument("--ppl-seq-len", type=int, default=512, help="window length in tokens, BOS included")
    parser.add_argument("--ppl-max-windows", type=int, default=None, help="measure at most this many windows")
    parser.add_argument("--ppl-tail", type=float, default=None,
                        help="use only the last fraction of the text's documents (e.g. 0.2 for the part calibration skipped)")
    parser.add_argument("--ppl-batch-size", type=int, default=4)


main_args = add_args  # the name the `compress eval` command imports


def heldout_ids(tokenizer, path, tail: float | None = None) -> torch.Tensor:
    """`[T]` token ids of the held-out text (optionally only its last `tail` fraction of documents)."""
    from compress import calib
    from compress.errors import UserError

    docs = calib.split_documents(calib.read_text(path))
    if tail is not None:
        if not 0.0 < tail < 1.0:
            raise UserError(f"--ppl-tail must be in (0, 1), got {tail}")
        docs = calib.head_and_tail(docs, 1.0 - tail)[1]
    return calib.token_stream(tokenizer, docs)


def make_windows(stream: torch.Tensor, bos_id: int, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """`[W, seq_len]` consecutive windows of `stream`, each led by BOS; the ragged tail is dropped."""
    from compress.errors import UserError

    if seq_len < 2:
        raise UserError(f"--ppl-seq-len must be at least 2, got {seq_len}")
    body = seq_len - 1
    count = len(stream) // body
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise UserError(f"held-out text has {len(stream)} tokens, fewer than one window of {seq_len}")
    import torch

    rows = stream[: count * body].view(count, body)
    return torch.cat([torch.full((count, 1), bos_id, dtype=torch.long), rows], dim=1)


def perplexity(model, windows: torch.Tensor, batch_size: int = 4, desc: str = "perplexity") -> dict:
    """Perplexity of `model` on `[W, L]` windows: predictions of positions 1..L-1 of each window."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, leave=False):
        ids = windows[start:start + batch_size].to(device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1].float()  # [B, L-1, V]
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        total_nll += nll.item()
        total_tokens += ids[:, 1:].numel()
    return {"perplexity": math.exp(total_nll / total_tokens), "nll": total_nll / total_tokens,
            "num_tokens": total_tokens, "num_windows": len(windows)}


def run_args(model, tokenizer, args) -> dict:
    """Perplexity on `args.perplexity` with the `--ppl-*` options; the result dict (with the settings)."""
    from compress.calib import bos_token_id

    stream = heldout_ids(tokenizer, args.perplexity, args.ppl_tail)
    windows = make_windows(stream, bos_token_id(tokenizer), args.ppl_seq_len, args.ppl_max_windows)
    result = perplexity(model, windows, args.ppl_batch_size)
    result.update(text=str(args.perplexity), tail=args.ppl_tail, seq_len=args.ppl_seq_len)
    return result


def load_lm(model_dir: str, device: str = "auto"):
    """A causal LM and its tokenizer from a dense or slimmed directory (via `compress.load` when present)."""
    import torch

    from compress.arch.gemma import load_causal_lm
    from compress.modeling import load_tokenizer

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    model = load_causal_lm(model_dir).to(device).eval()
    return model, load_tokenizer(model_dir)


def run_eval_command(args) -> int:
    """`compress eval DIR --perplexity PATH [--json OUT]`: print (and save) the perplexity of DIR."""
    from pathlib import Path

    from compress.hub import resolve_model

    model, tokenizer = load_lm(str(resolve_model(args.model)), getattr(args, "device", None) or "auto")
    result = run_args(model, tokenizer, args)
    print(f"perplexity {result['perplexity']:.3f} on {result['text']} ({result['num_tokens']} tokens, "
          f"{result['num_windows']} windows of {result['seq_len']})")
    if getattr(args, "json_out", None):
        Path(args.json_out).write_text(json.dumps({"model": str(args.model), "perplexity": result}, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="model directory or name")
    add_args(parser, flag="--text")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if args.perplexity is None:
        parser.error("--text is required")
    from compress.hub import resolve_model

    model, tokenizer = load_lm(str(resolve_model(args.model)), args.device)
    print(json.dumps(run_args(model, tokenizer, args), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
