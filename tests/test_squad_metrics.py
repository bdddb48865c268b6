"""SQuAD metrics against values worked out by hand (see the comment above each expected number)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from compress.errors import UserError
from compress.data.squad import load_squad, read_squad_file, score_files
from evals.squad import main
from compress.data.squad_metrics import best_threshold, exact_match, f1_score, normalize_answer, squad_scores

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("raw, normal", [
    ("The  Quick, brown fox!", "quick brown fox"),  # case, punctuation, article, spaces
    ("An apple a day", "apple day"),
    ("theatre then another", "theatre then another"),  # articles only as whole words
    ("Halvorsen-Pike", "halvorsenpike"),  # punctuation is deleted, not turned into a space
    ("  the   1880s.  ", "1880s"),
    ("A", ""),
])
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


def test_exact_match_takes_the_best_gold_answer():
    golds = ["from the 1880s", "1880s"]
    assert exact_match("The 1880s", golds) == 1.0  # "1880s" == "1880s"
    assert exact_match("in the 1880s", golds) == 0.0
    assert exact_match("FROM the 1880s!", golds) == 1.0


def test_f1_is_the_max_over_gold_answers():
    golds = ["Bobby Fischer", "the former world champion Bobby Fischer"]
    # pred tokens {former, champion, bobby, fischer}: vs gold 1, P=2/4 R=2/2 -> 2/3;
    # vs gold 2 (5 tokens), P=4/4 R=4/5 -> 8/9; the max is 8/9.
    assert f1_score("the former champion Bobby Fischer", golds) == pytest.approx(8 / 9)
    # repeated tokens count once per match: common = min(2, 1) = 1, P = 1/3, R = 1 -> F1 = 1/2
    assert f1_score("coal coal mines", ["coal"]) == pytest.approx(0.5)
    assert f1_score("sea level", ["1962"]) == 0.0


def test_empty_predictions_and_unanswerable_questions():
    assert exact_match("", []) == 1.0 and f1_score("", []) == 1.0  # "no answer" on a NoAns question
    assert exact_match("Kelby", []) == 0.0 and f1_score("Kelby", []) == 0.0
    assert exact_match("", ["Kelby"]) == 0.0 and f1_score("", ["Kelby"]) == 0.0
    # a gold answer that normalises to "" is dropped unless nothing else is left
    assert exact_match("", ["The"]) == 1.0
    assert exact_match("", ["the", "Kelby"]) == 0.0


def test_squad_scores_v2_breakdown():
    answers = {"a": ["31 metres"], "b": ["the Wend", "Wend"], "c": [], "d": []}
    predictions = {"a": "31 metres tall", "b": "Wend", "c": "", "d": "coal"}
    out = squad_scores(predictions, answers)
    # EM: a 0, b 1, c 1, d 0 -> 50; F1: a = 2*(2/3*1)/(5/3) = 0.8, b 1, c 1, d 0 -> 70
    assert out["exact_match"] == pytest.approx(50.0) and out["f1"] == pytest.approx(70.0)
    assert (out["HasAns_exact"], out["HasAns_f1"], out["HasAns_total"]) == pytest.approx((50.0, 90.0, 2))
    assert (out["NoAns_exact"], out["NoAns_f1"], out["NoAns_total"]) == pytest.approx((50.0, 50.0, 2))
    assert "best_exact" not in out
    v1 = squad_scores({"a": "31 metres"}, {"a": ["31 metres"]})
    assert v1 == {"exact_match": 100.0, "f1": 100.0, "total": 1}
    with pytest.raises(ValueError, match="no prediction"):
        squad_scores({}, answers)


def test_best_threshold_by_hand():
    # q1 HasAns right (EM 1, na -2), q2 HasAns wrong (0, na 0.5), q3/q4 NoAns with spans (na 1.0 / -1).
    scores = {"q1": 1.0, "q2": 0.0, "q3": 0.0, "q4": 0.0}
    na = {"q1": -2.0, "q2": 0.5, "q3": 1.0, "q4": -1.0}
    has = {"q1": True, "q2": True, "q3": False, "q4": False}
    # never answer: 2/4; t=-2: +1 -> 3/4; t=-1: -1 -> 2/4; t=0.5: +0; t=1: -1 -> 1/4. Best 75 at -2.
    assert best_threshold(scores, na, has) == (pytest.approx(75.0), -2.0)
    # ties move together: q1 and q4 both at -2 give +1-1 = 2/4, never beating "never answer".
    assert best_threshold(scores, dict(na, q4=-2.0), has) == (pytest.approx(50.0), None)
    assert best_threshold({"q1": 1.0}, {"q1": 3.0}, {"q1": True}) == (100.0, 3.0)


def test_squad_scores_threshold_uses_best_spans():
    answers = {"q1": ["Venn"], "q2": []}
    final = {"q1": "", "q2": ""}  # decoding chose "no answer" for both
    spans = {"q1": "Venn", "q2": "granite"}
    out = squad_scores(final, answers, {"q1": 0.2, "q2": 0.9}, spans)
    assert out["exact_match"] == 50.0
    # answering below 0.2 recovers q1 and keeps q2 empty: 100% at threshold 0.2
    assert (out["best_exact"], out["best_exact_thresh"]) == (100.0, 0.2)
    assert (out["best_f1"], out["best_f1_thresh"]) == (100.0, 0.2)


def test_fixture_files_read_back(tmp_path):
    v1 = load_squad("squad", "dev", FIXTURES)
    v2 = load_squad("squad_v2", "dev", FIXTURES)
    assert len(v1) == 11 and len(v2) == 15 and sum(not ex["answers"] for ex in v2) == 4
    assert min(len(ex["answers"]) for ex in v1) >= 2  # dev sets carry several gold answers
    for ex in v1 + v2:
        for text, start in zip(ex["answers"], ex["answer_starts"]):
            assert ex["context"][start : start + len(text)] == text
    gz = tmp_path / "squad" / "dev-v1.1.json.gz"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress((FIXTURES / "squad" / "dev-v1.1.json").read_bytes()))
    assert load_squad("squad", "dev", tmp_path) == v1


def test_bad_data_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_squad("squad", "dev", tmp_path)
    (tmp_path / "bad.json").write_text('{"data": [{"paragraphs": [{}]}]}')
    with pytest.raises(UserError, match="not a readable SQuAD"):
        read_squad_file(tmp_path / "bad.json")
    with pytest.raises(UserError, match="unknown QA task"):
        load_squad("squad3", "dev", tmp_path)


def test_score_files_cli(tmp_path, capsys):
    examples = read_squad_file(FIXTURES / "squad" / "dev-v2.0.json")
    gold = {ex["id"]: (ex["answers"][0] if ex["answers"] else "") for ex in examples}
    (tmp_path / "pred.json").write_text(json.dumps(gold))
    assert main(["--score", str(FIXTURES / "squad" / "dev-v2.0.json"), str(tmp_path / "pred.json"),
                 "--json", str(tmp_path / "out.json")]) == 0
    out = json.loads((tmp_path / "out.json").read_text())["metrics"]
    assert out["exact_match"] == 100.0 and out["NoAns_total"] == 4
    assert "exact_match" in capsys.readouterr().out
    (tmp_path / "pred.json").write_text(json.dumps({}))
    assert main(["--score", str(FIXTURES / "squad" / "dev-v2.0.json"), str(tmp_path / "pred.json")]) == 2
    with pytest.raises(UserError, match="no prediction"):
        score_files(FIXTURES / "squad" / "dev-v2.0.json", tmp_path / "pred.json")
