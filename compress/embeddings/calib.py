"""Calibration text for label-free pruning of embedding models: passages of one to a few sentences.

The text comes from where a decoder's does (compress.data.calib): `--calib` (a .txt/.txt.gz file, a
directory of them, or `bbc-news`), else the head of the shared Wikipedia sample in the data directory,
else the BBC News training articles (they ship on PyPI). An embedding model is asked to embed short
texts (queries, sentences, passages), so the documents are cut into runs of 1 to `MAX_SENTENCES`
consecutive sentences taken at seeded random places; the pruning pipeline truncates them to
`max_seq_length` tokens.
"""

from __future__ import annotations

import random
import re

from compress.data import calib as text

MAX_SENTENCES = 4
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def documents(calib: str | None, data_dir) -> tuple[list[str], str]:
    """(documents, where they came from) for `--calib` or the defaults above."""
    if calib in text.NAMED_CORPORA:
        return text.NAMED_CORPORA[calib](), f"the {calib} corpus (its training split)"
    if calib:
        return text.split_documents(text.read_text(calib)), f"text from {calib}"
    wiki = text.wikipedia_path(data_dir)
    if wiki is not None:
        docs = text.head_and_tail(text.split_documents(text.read_text(wiki)), text.CALIB_FRACTION)[0]
        return docs, f"first {text.CALIB_FRACTION:.0%} of the articles of {wiki}"
    return text.NAMED_CORPORA["bbc-news"](), "the bbc-news corpus (its training split; no --calib, no local text)"


def passages(docs: list[str], num_samples: int, seed: int) -> list[str]:
    """`num_samples` passages of 1..MAX_SENTENCES consecutive sentences from seeded random places."""
    sentences = [s.strip() for doc in docs for line in doc.splitlines() if not line.strip().startswith("=")
                 for s in _SENTENCE_END.split(line) if len(s.split()) >= 3]
    if not sentences:
        from compress.errors import UserError

        raise UserError("the calibration text has no sentences of three words or more")
    rng = random.Random(seed)
    out = []
    for _ in range(num_samples):
        start, size = rng.randrange(len(sentences)), rng.randint(1, MAX_SENTENCES)
        out.append(" ".join(sentences[start:start + size]))
    return out
