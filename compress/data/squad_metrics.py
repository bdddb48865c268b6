"""The official SQuAD v1.1 / v2.0 metrics, written from their definition (no hub, no torch).

Rajpurkar et al., "SQuAD: 100,000+ Questions for Machine Comprehension of Text" (2016) and "Know What
You Don't Know: Unanswerable Questions for SQuAD" (2018). Definitions implemented here:
- an answer is normalised by lower-casing, dropping ASCII punctuation, dropping the articles
  a / an / the as whole words, and collapsing white space;
- exact match is 1 when the normalised prediction equals a normalised gold answer; token F1 is the
  harmonic mean of precision and recall over the bag of normalised tokens; both are the maximum over
  the gold answers;
- an unanswerable question (v2.0) has the single gold answer "" and the empty prediction means "no
  answer"; when either side has no tokens, F1 is 1 if both are empty and 0 otherwise. Gold answers
  that normalise to "" are dropped unless nothing else remains (as the v2.0 script does; v1.1 has none);
- v2.0 also reports HasAns / NoAns sub-totals and the best threshold on a no-answer score: the
  question is answered "" when its score is above the threshold, and the threshold is chosen to
  maximise EM (and, separately, F1) over the set.

Scores are percentages (0-100) as in the official scripts.
"""

from __future__ import annotations

import collections
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split() if text else []


def _golds(answers: list[str]) -> list[str]:
    kept = [a for a in answers if normalize_answer(a)]
    return kept or [""]


def exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(gold) for gold in _golds(answers)))


def _f1_one(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers: list[str]) -> float:
    """Token-level F1 against the best-matching gold answer."""
    pred_tokens = _tokens(prediction)
    return max(_f1_one(pred_tokens, _tokens(gold)) for gold in _golds(answers))


def _mean(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else 0.0


def best_threshold(scores: dict, na_scores: dict, has_answer: dict) -> tuple[float, float | None]:
    """Best total score (percent) over thresholds on `na_scores`, and the threshold reaching it.

    `scores[qid]` is the metric of the question's best non-empty answer. At threshold t a question
    is answered when na_scores[qid] <= t, otherwise "no answer" (worth 1 on NoAns questions, 0 on
    HasAns). Thresholds are tried at every distinct na-score, ties moving together; `None` means
    "never answer" won (every threshold below the smallest score).
    """
    total = sum(1.0 for qid in scores if not has_answer[qid])  # everything answered ""
    best, best_t = total, None
    by_score = collections.defaultdict(list)
    for qid in scores:
        by_score[na_scores[qid]].append(qid)
    for t in sorted(by_score):
        total += sum(scores[q] - (0.0 if has_answer[q] else 1.0) for q in by_score[t])
        if total > best:
            best, best_t = total, t
    return 100.0 * best / max(len(scores), 1), best_t


def squad_scores(
    predictions: dict[str, str],
    answers: dict[str, list[str]],
    na_scores: dict[str, float] | None = None,
    span_predictions: dict[str, str] | None = None,
) -> dict:
    """Official-style scores for `predictions` (qid -> text; "" = no answer) against `answers`.

    With `na_scores` (qid -> no-answer score, higher = more likely unanswerable) the v2.0 threshold
    search runs on `span_predictions` (qid -> best non-empty span; defaults to `predictions`).
    HasAns/NoAns keys appear when the set has unanswerable questions or `na_scores` is given.
    """
    missing = [qid for qid in answers if qid not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} questions have no prediction (first: {missing[0]})")
    qids = list(answers)
    em = {q: exact_match(predictions[q], answers[q]) for q in qids}
    f1 = {q: f1_score(predictions[q], answers[q]) for q in qids}
    out = {"exact_match": _mean(list(em.values())), "f1": _mean(list(f1.values())), "total": len(qids)}
    has_answer = {q: bool(_golds(answers[q])[0]) for q in qids}
    if na_scores is None and all(has_answer.values()):
        return out
    for name, keep in (("HasAns", True), ("NoAns", False)):
        group = [q for q in qids if has_answer[q] == keep]
        out[f"{name}_exact"] = _mean([em[q] for q in group])
        out[f"{name}_f1"] = _mean([f1[q] for q in group])
        out[f"{name}_total"] = len(group)
    if na_scores is not None:
        spans = span_predictions or predictions
        span_em = {q: exact_match(spans[q], answers[q]) for q in qids}
        span_f1 = {q: f1_score(spans[q], answers[q]) for q in qids}
        out["best_exact"], out["best_exact_thresh"] = best_threshold(span_em, na_scores, has_answer)
        out["best_f1"], out["best_f1_thresh"] = best_threshold(span_f1, na_scores, has_answer)
    return out
