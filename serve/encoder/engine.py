"""`Encoder`: the encoder engine and its Python API (`embed`, `classify`), run synchronously.

`run(kind, token_ids)` is the one path every input takes, from Python and from HTTP alike: inputs are
planned into token-budget batches (batching.py), each batch goes through the model in one forward,
and the rows come back in input order. Inputs are tokenized here: a text gets the model's special
tokens; one longer than `max_model_len` is cut to it when `truncate` is asked for, else refused with a
ValueError that names it. The counters in `metrics` feed GET /metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from compress.device import pick_device
from serve.encoder import batching
from serve.encoder.config import EncoderConfig
from serve.encoder.model import EncoderModel

EMBED, CLASSIFY = "embed", "classify"


@dataclass
class EncoderMetrics:
    requests: int = 0
    inputs: int = 0
    prompt_tokens: int = 0
    padded_tokens: int = 0  # tokens the forwards ran, padding included
    batches: int = 0
    busy_seconds: float = 0.0


class Encoder:
    """`Encoder(DIR).embed(texts)` -> `[N, D]`; `.classify(texts)` -> logits `[N, C]` (float32, CPU)."""

    def __init__(self, model: str, **settings):
        from compress.models.checkpoint import resolve

        self.config = EncoderConfig(model=str(model), **settings).validate()
        device = pick_device(self.config.device)
        self.model = EncoderModel(resolve(model), device, _dtype(self.config.dtype, device))
        self.tokenizer = self.model.tokenizer
        self.max_model_len = self.config.max_model_len or self.model.max_length()
        if self.max_model_len > self.config.max_num_batched_tokens:
            raise ValueError(f"max_num_batched_tokens ({self.config.max_num_batched_tokens}) must hold one input "
                             f"of max_model_len ({self.max_model_len}) tokens")
        self.metrics = EncoderMetrics()
        self._token_types = "token_type_ids" in self.tokenizer.model_input_names
        self._specials = _special_tokens(self.tokenizer)

    @property
    def can_classify(self) -> bool:
        return self.model.has_head

    def embed(self, texts: str | list[str], truncate: bool = False) -> torch.Tensor:
        return self.run(EMBED, self.tokenize(_listed(texts), truncate))

    def classify(self, texts: str | list[str], truncate: bool = False) -> torch.Tensor:
        return self.run(CLASSIFY, self.tokenize(_listed(texts), truncate))

    def tokenize(self, inputs: list, truncate: bool = False) -> list[list[int]]:
        """Model inputs for texts (or lists of token ids, taken as the text's tokens), special tokens added."""
        texts = [i for i, x in enumerate(inputs) if isinstance(x, str)]
        pieces = list(inputs)
        if texts:
            encoded = self.tokenizer([inputs[i] for i in texts], add_special_tokens=False, verbose=False)
            for i, ids in zip(texts, encoded["input_ids"]):
                pieces[i] = ids
        return [self._with_specials(i, ids, truncate) for i, ids in enumerate(pieces)]

    def _with_specials(self, index: int, ids: list[int], truncate: bool) -> list[int]:
        prefix, suffix = self._specials
        room = self.max_model_len - len(prefix) - len(suffix)
        if len(ids) > room and not truncate:
            raise ValueError(f"input {index} has {len(ids) + len(prefix) + len(suffix)} tokens, more than this "
                             f"model's limit of {self.max_model_len}; shorten it or ask for truncation")
        return prefix + list(ids[:room]) + suffix

    def run(self, kind: str, token_ids: list[list[int]]) -> torch.Tensor:
        """Rows of `kind` (EMBED or CLASSIFY) for model inputs `token_ids`, in their order."""
        if not token_ids:
            raise ValueError("no inputs")
        forward = self.model.embed if kind == EMBED else self.model.classify
        lengths = [len(ids) for ids in token_ids]
        plan = batching.plan(lengths, self.config.max_num_batched_tokens)
        start, rows = time.perf_counter(), [None] * len(token_ids)
        for batch in plan:
            out = forward(batching.collate([token_ids[i] for i in batch], _pad_id(self.tokenizer),
                                           self._token_types, self.model.device))
            for row, i in zip(out, batch):
                rows[i] = row
        self._count(len(token_ids), sum(lengths), batching.padded_tokens(lengths, plan), len(plan), start)
        return torch.stack(rows)

    def _count(self, inputs: int, tokens: int, padded: int, batches: int, start: float) -> None:
        m = self.metrics
        m.inputs, m.prompt_tokens, m.padded_tokens = m.inputs + inputs, m.prompt_tokens + tokens, m.padded_tokens + padded
        m.batches, m.busy_seconds = m.batches + batches, m.busy_seconds + time.perf_counter() - start


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after one text's tokens ([CLS] and [SEP] for BERT): cutting
    between them truncates exactly as the tokenizer's own truncation of a single text does."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    at = next(i for i in range(len(full)) if full[i:i + len(bare)] == bare)
    return full[:at], full[at + len(bare):]


def _listed(texts) -> list:
    return [texts] if isinstance(texts, str) else list(texts)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)
