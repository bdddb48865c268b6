"""Extractive question answering (SQuAD v1.1 / v2.0): windows, labels, span loss and span decoding.

Owns the step between SQuAD examples and a `...ForQuestionAnswering` encoder (Devlin et al. 2019, the
BERT SQuAD recipe; Rajpurkar et al. 2018 for unanswerable questions):
- a context longer than the model window is cut into overlapping windows of `max_length` tokens
  (`[CLS] question [SEP] context-piece [SEP]`); consecutive windows share `doc_stride` context tokens
  (the Hugging Face tokenizer's meaning of `stride`);
- a training window is labelled with the token positions of the first gold answer, or with the [CLS]
  position when the question is unanswerable or the answer is not wholly inside the window;
- the span loss is the mean of the start and end cross-entropies (used for fine-tuning and as the
  task loss whose mask gradients give the pruning Fisher);
- decoding takes the n-best starts and ends of every window of an example, keeps spans inside the
  context of at most `max_answer_length` tokens, and returns the best one over all windows; for v2.0
  the no-answer score is (min over windows of the [CLS] start+end logit) - (best span score).

Shapes: a window is an unpadded 1-D int array; a batch is [B, S] (S = longest window in the batch);
logits are [B, S]; `offsets` are [S, 2] character offsets into the context, -1 outside the context.
Examples are dicts with keys id, question, context, answers (list of str), answer_starts (list of int).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

# BERT-family encoders put [CLS] (RoBERTa/MPNet: <s>) first; it is the "no answer" position.
CLS_INDEX = 0

@dataclass
class QAConfig:
    """Windowing and decoding settings (defaults: the standard SQuAD recipe)."""

    max_length: int = 384
    doc_stride: int = 128
    max_answer_length: int = 30
    n_best: int = 20
    null_threshold: float = 0.0  # v2.0: answer "" when the no-answer score exceeds this
    # The BERT recipe cuts questions to 64 tokens so that every window keeps room for context.
    max_question_tokens: int = 64

    def __post_init__(self):
        room = self.max_length - self.max_question_tokens - 3  # [CLS] q [SEP] context [SEP]
        if self.max_question_tokens < 1 or room < 1:
            raise ValueError(f"max_length ({self.max_length}) leaves no room for context after a "
                             f"{self.max_question_tokens}-token question")
        if not 0 <= self.doc_stride < room:
            raise ValueError(f"doc_stride must be in [0, {room}) for max_length {self.max_length}, got {self.doc_stride}")
        if self.max_answer_length < 1 or self.n_best < 1:
            raise ValueError("max_answer_length and n_best must be positive")


@dataclass
class QAFeatures:
    """Tokenised windows of a list of examples (training labels or evaluation offsets)."""

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray] | None
    example_index: np.ndarray  # [F] window -> index of its example
    offsets: list[np.ndarray] = field(default_factory=list)  # eval: [S, 2] per window
    start_positions: np.ndarray | None = None  # train: [F]
    end_positions: np.ndarray | None = None
    pad_token_id: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """A padded model batch of the given windows (with span labels for training features)."""
        rows = [self.input_ids[i] for i in indices]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        types = torch.zeros((len(rows), width), dtype=torch.long)
        for b, i in enumerate(indices):
            n = len(self.input_ids[i])
            ids[b, :n] = torch.from_numpy(self.input_ids[i].astype(np.int64))
            mask[b, :n] = 1
            if self.token_type_ids is not None:
                types[b, :n] = torch.from_numpy(self.token_type_ids[i].astype(np.int64))
        out = {"input_ids": ids, "attention_mask": mask}
        if self.token_type_ids is not None:
            out["token_type_ids"] = types
        if self.start_positions is not None:
            out["start_positions"] = torch.as_tensor(self.start_positions[list(indices)], dtype=torch.long)
            out["end_positions"] = torch.as_tensor(self.end_positions[list(indices)], dtype=torch.long)
        return out

    def batches(self, batch_size: int, order=None):
        """Yield padded batches over `order` (default: all windows in order)."""
        order = np.arange(len(self)) if order is None else np.asarray(order)
        for lo in range(0, len(order), batch_size):
            yield self.batch(order[lo : lo + batch_size].tolist())


def _short_questions(tokenizer, questions: list[str], max_tokens: int) -> list[str]:
    """Questions cut (at a token boundary) to `max_tokens` tokens."""
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True,
                    truncation=True, max_length=max_tokens)
    return [q[: offs[-1][1]] if offs else q for q, offs in zip(questions, enc["offset_mapping"])]


def _window_label(offsets: np.ndarray, in_context: np.ndarray, example: dict, cls_index: int):
    """(start, end) token positions of the first gold answer in this window, else (cls, cls)."""
    if not example["answers"]:
        return cls_index, cls_index
    start_char = example["answer_starts"][0]
    end_char = start_char + len(example["answers"][0])
    ctx = np.flatnonzero(in_context)
    if offsets[ctx[0], 0] > start_char or offsets[ctx[-1], 1] < end_char:
        return cls_index, cls_index
    start = ctx[offsets[ctx, 0] <= start_char][-1]
    end = ctx[offsets[ctx, 1] >= end_char][0]
    return int(start), int(end)


def featurize(examples: list[dict], tokenizer, cfg: QAConfig, train: bool, progress: bool = True,
              chunk: int = 256) -> QAFeatures:
    """Cut every example into windows; labels for training, context offsets for evaluation."""
    from tqdm.auto import tqdm

    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("question answering needs a fast tokenizer (offset mappings)")
    ids, types, owner, offsets, starts, ends = [], [], [], [], [], []
    bar = tqdm(total=len(examples), desc="preprocess", unit="ex", disable=not progress)
    for lo in range(0, len(examples), chunk):
        part = examples[lo : lo + chunk]
        questions = _short_questions(tokenizer, [ex["question"].lstrip() for ex in part], cfg.max_question_tokens)
        enc = tokenizer(questions, [ex["context"] for ex in part], truncation="only_second",
                        max_length=cfg.max_length, stride=cfg.doc_stride, return_overflowing_tokens=True,
                        return_offsets_mapping=True)
        for w, sample in enumerate(enc["overflow_to_sample_mapping"]):
            in_context = np.array([s == 1 for s in enc.sequence_ids(w)])
            offs = np.asarray(enc["offset_mapping"][w], dtype=np.int64).reshape(-1, 2)
            offs[~in_context] = -1
            ids.append(np.asarray(enc["input_ids"][w], dtype=np.int32))
            if "token_type_ids" in enc:
                types.append(np.asarray(enc["token_type_ids"][w], dtype=np.int8))
            owner.append(lo + sample)
            if train:
                s, e = _window_label(offs, in_context, part[sample], CLS_INDEX)
                starts.append(s), ends.append(e)
            else:
                offsets.append(offs)
        bar.update(len(part))
    bar.close()
    feats = QAFeatures(ids, types or None, np.asarray(owner, dtype=np.int64), offsets,
                       pad_token_id=tokenizer.pad_token_id or 0)
    if train:
        feats.start_positions, feats.end_positions = np.asarray(starts), np.asarray(ends)
    return feats


def span_loss(start_logits, end_logits, start_positions, end_positions, reduction: str = "mean") -> torch.Tensor:
    """Half the sum of the start and end cross-entropies over window positions ([B, S] logits).

    `reduction="sum"` adds the per-window losses: the Fisher needs each window's own gradient.
    """
    return 0.5 * (F.cross_entropy(start_logits.float(), start_positions, reduction=reduction)
                  + F.cross_entropy(end_logits.float(), end_positions, reduction=reduction))


def batch_span_loss(model, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """The span loss of a QA model on a batch carrying start/end positions."""
    inputs = {k: v for k, v in batch.items() if k not in ("start_positions", "end_positions")}
    out = model(**inputs)
    return span_loss(out.start_logits, out.end_logits, batch["start_positions"], batch["end_positions"],
                     reduction)


@torch.no_grad()
def predict_logits(model, feats: QAFeatures, batch_size: int = 32, progress: bool = True):
    """Start and end logits of every window, as lists of 1-D float arrays (unpadded)."""
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    starts, ends = [], []
    num_batches = (len(feats) + batch_size - 1) // batch_size
    for batch in tqdm(feats.batches(batch_size), total=num_batches, desc="inference", unit="batch",
                      disable=not progress):
        out = model(**{k: v.to(device) for k, v in batch.items()})
        lengths = batch["attention_mask"].sum(1).tolist()
        for b, n in enumerate(lengths):
            starts.append(out.start_logits[b, :n].float().cpu().numpy())
            ends.append(out.end_logits[b, :n].float().cpu().numpy())
    return starts, ends


def best_span(start: np.ndarray, end: np.ndarray, offsets: np.ndarray, cfg: QAConfig):
    """(score, first_char, last_char_exclusive) of the best valid span in one window, or None."""
    in_context = offsets[:, 0] >= 0
    top_starts = np.argsort(-start, kind="stable")[: cfg.n_best]
    top_ends = np.argsort(-end, kind="stable")[: cfg.n_best]
    best = None
    for s in top_starts:
        for e in top_ends:
            if not (in_context[s] and in_context[e]) or e < s or e - s + 1 > cfg.max_answer_length:
                continue
            score = float(start[s] + end[e])
            if best is None or score > best[0]:
                best = (score, int(offsets[s, 0]), int(offsets[e, 1]))
    return best


def decode(examples: list[dict], feats: QAFeatures, starts, ends, cfg: QAConfig, v2: bool):
    """Answer texts over all windows of each example.

    Returns (predictions, spans, na_scores), each keyed by example id: the final answer ("" for no
    answer, v2.0 only), the best non-empty span, and the no-answer score (null - best span; v2.0).
    """
    windows = [[] for _ in examples]
    for w, ex in enumerate(feats.example_index):
        windows[ex].append(w)
    predictions, spans, na_scores = {}, {}, {}
    for ex, example in enumerate(examples):
        candidates = [best_span(starts[w], ends[w], feats.offsets[w], cfg) for w in windows[ex]]
        candidates = [c for c in candidates if c is not None]
        score, lo, hi = max(candidates, key=lambda c: c[0], default=(float("-inf"), 0, 0))
        spans[example["id"]] = example["context"][lo:hi]
        predictions[example["id"]] = spans[example["id"]]
        if v2:
            null = min(float(starts[w][CLS_INDEX] + ends[w][CLS_INDEX]) for w in windows[ex])
            na_scores[example["id"]] = null - score if candidates else float("inf")
            if na_scores[example["id"]] > cfg.null_threshold:
                predictions[example["id"]] = ""
    return predictions, spans, na_scores
