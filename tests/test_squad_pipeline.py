"""SQuAD pipeline on the fixture: windows and labels, span decoding across windows, loss, CLI end to end.

Small windows (max length 48, stride 16, questions cut to 16 tokens) make every fixture paragraph
span several windows, so answers straddle window boundaries. The tokenizer is a WordPiece vocabulary
built from the fixture's words (plus single characters), so nothing is downloaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.data.qa import QAConfig, batch_span_loss, decode, featurize, predict_logits, span_loss
from compress.data.squad import load_squad
from compress.train.qa import evaluate_model
from compress.data.squad_metrics import normalize_answer

FIXTURES = Path(__file__).parent / "fixtures"
SMALL = QAConfig(max_length=48, doc_stride=16, max_question_tokens=16)


def fixture_tokenizer():
    from transformers import BertTokenizer

    words = set()
    for path in (FIXTURES / "squad").glob("*-v2.0.json"):
        for article in json.loads(path.read_text())["data"]:
            for para in article["paragraphs"]:
                texts = [para["context"]] + [qa["question"] for qa in para["qas"]]
                words.update(w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower()))
    chars = sorted(set("".join(words)))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = list(dict.fromkeys(specials + chars + ["##" + c for c in chars] + sorted(words)))
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def tiny_qa_model(vocab_size: int, seed: int = 0):
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForQuestionAnswering(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return fixture_tokenizer()


def _answer_pieces(feats, examples):
    """Per example: (windows labelled with the answer, windows that hold only part of it)."""
    out = []
    for ex_index, ex in enumerate(examples):
        lo = ex["answer_starts"][0]
        hi = lo + len(ex["answers"][0])
        whole, part = [], []
        for w in np.flatnonzero(feats.example_index == ex_index):
            span = feats.offsets[w][feats.offsets[w][:, 0] >= 0]
            first, last = span[0, 0], span[-1, 1]
            if first <= lo and hi <= last:
                whole.append(w)
            elif first < hi and lo < last:
                part.append(w)
        out.append((whole, part))
    return out


def test_windows_labels_and_straddling_answers(tokenizer):
    examples = [ex for ex in load_squad("squad", "train", FIXTURES)]
    train = featurize(examples, tokenizer, SMALL, train=True, progress=False)
    evalf = featurize(examples, tokenizer, SMALL, train=False, progress=False)
    assert max(len(ids) for ids in train.input_ids) == SMALL.max_length
    assert len(train) > 3 * len(examples)  # every paragraph is cut into several windows
    pieces = _answer_pieces(evalf, examples)
    assert sum(bool(part) for _, part in pieces) >= 2  # some answers are cut by a window boundary
    for ex_index, (ex, (whole, part)) in enumerate(zip(examples, pieces)):
        assert whole, f"{ex['id']}: the answer fits in no window"
        for w in np.flatnonzero(train.example_index == ex_index):
            s, e = train.start_positions[w], train.end_positions[w]
            if w in part or w not in whole:
                assert s == e == 0  # answer missing or cut: the window points at [CLS]
            else:
                text = ex["context"][evalf.offsets[w][s, 0] : evalf.offsets[w][e, 1]]
                assert normalize_answer(text) == normalize_answer(ex["answers"][0])


def test_unanswerable_windows_point_at_cls(tokenizer):
    examples = [ex for ex in load_squad("squad_v2", "train", FIXTURES) if not ex["answers"]]
    train = featurize(examples, tokenizer, SMALL, train=True, progress=False)
    assert len(examples) == 4 and (train.start_positions == 0).all() and (train.end_positions == 0).all()


class OracleQA(torch.nn.Module):
    """A 'model' that knows the labelled span of every training window and scores it highest."""

    def __init__(self, feats, noise: float = 0.5):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.labels = {tuple(ids.tolist()): (s, e) for ids, s, e in
                       zip(feats.input_ids, feats.start_positions, feats.end_positions)}
        self.noise = noise

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        g = torch.Generator().manual_seed(int(input_ids.sum()))
        start = self.noise * torch.randn(input_ids.shape, generator=g)
        end = self.noise * torch.randn(input_ids.shape, generator=g)
        for b, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            s, e = self.labels[tuple(ids[mask.bool()].tolist())]
            start[b, s] += 10.0
            end[b, e] += 10.0
        return type("Out", (), {"start_logits": start, "end_logits": end})


@pytest.mark.parametrize("task", ["squad", "squad_v2"])
def test_decoding_finds_answers_across_windows(tokenizer, task):
    examples = load_squad(task, "dev", FIXTURES)
    answered = [ex for ex in examples if ex["answers"]]
    pieces = _answer_pieces(featurize(answered, tokenizer, SMALL, train=False, progress=False), answered)
    assert any(part for _, part in pieces)  # the right window must win over one holding half the answer
    oracle = OracleQA(featurize(examples, tokenizer, SMALL, train=True, progress=False))
    result = evaluate_model(oracle, tokenizer, task, examples, SMALL, batch_size=5, progress=False)
    assert result["metrics"]["exact_match"] == 100.0 and result["metrics"]["f1"] == 100.0
    if task == "squad_v2":
        assert result["metrics"]["NoAns_total"] == 4 and result["metrics"]["best_exact"] == 100.0
        # the null score is the minimum over windows: only unanswerable questions stay above 0
        assert {k for k, v in result["na_scores"].items() if v > 0} == {
            ex["id"] for ex in examples if not ex["answers"]}


def test_decoding_respects_the_answer_length_and_context(tokenizer):
    examples = load_squad("squad", "dev", FIXTURES)[:2]
    feats = featurize(examples, tokenizer, SMALL, train=False, progress=False)
    starts = [np.zeros(len(ids), dtype=np.float32) for ids in feats.input_ids]
    ends = [s.copy() for s in starts]
    firsts = [int(np.flatnonzero(feats.example_index == i)[0]) for i in range(len(examples))]
    for w in firsts:  # best raw scores on question tokens, then on a too-long span
        starts[w][1:4] = 50.0
        ctx = np.flatnonzero(feats.offsets[w][:, 0] >= 0)
        starts[w][ctx[0]], ends[w][ctx[-1]] = 20.0, 20.0
        ends[w][ctx[1]] = 5.0
    cfg = QAConfig(max_length=48, doc_stride=16, max_question_tokens=16, max_answer_length=3)
    predictions, _, _ = decode(examples, feats, starts, ends, cfg, v2=False)
    for ex, w in zip(examples, firsts):
        ctx = feats.offsets[w][feats.offsets[w][:, 0] >= 0]
        assert predictions[ex["id"]] == ex["context"][ctx[0, 0] : ctx[1, 1]]


def test_batched_inference_matches_single_windows(tokenizer):
    model = tiny_qa_model(len(tokenizer))
    feats = featurize(load_squad("squad_v2", "dev", FIXTURES)[:3], tokenizer, SMALL, train=False, progress=False)
    batched, _ = predict_logits(model, feats, batch_size=4, progress=False)
    single, _ = predict_logits(model, feats, batch_size=1, progress=False)
    for a, b in zip(batched, single):
        assert a.shape == b.shape and np.allclose(a, b, atol=1e-4)


def test_span_loss_matches_the_hf_head(tokenizer):
    model = tiny_qa_model(len(tokenizer))
    feats = featurize(load_squad("squad_v2", "train", FIXTURES), tokenizer, SMALL, train=True, progress=False)
    batch = feats.batch(list(range(0, len(feats), 7)))
    assert (batch["start_positions"] > 0).any() and (batch["start_positions"] == 0).any()
    ours = batch_span_loss(model, batch)
    assert torch.allclose(ours, model(**batch).loss, atol=1e-6)
    logits = torch.tensor([[0.0, 2.0, 0.0]])
    expected = -torch.log_softmax(logits, -1)[0, 1]  # both ends on position 1: loss = its NLL
    assert torch.allclose(span_loss(logits, logits, torch.tensor([1]), torch.tensor([1])), expected)
    ours.backward()
    assert model.qa_outputs.weight.grad.abs().sum() > 0


def test_config_is_validated():
    with pytest.raises(ValueError, match="doc_stride"):
        QAConfig(max_length=48, doc_stride=40, max_question_tokens=16)
    with pytest.raises(ValueError, match="no room"):
        QAConfig(max_length=32, max_question_tokens=64)


@pytest.fixture(scope="module")
def tiny_qa_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("qa") / "tiny"
    tiny_qa_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_window_length_defaults_to_the_task_and_an_explicit_one_is_honoured():
    from types import SimpleNamespace

    from compress.pruning.config import PruneConfig
    from compress.train.config import FinetuneConfig
    from compress.train.qa import qa_config

    assert FinetuneConfig().max_seq_length is None and PruneConfig().max_seq_length is None
    assert qa_config(None).max_length == 384 and qa_config(128).max_length == 128
    small = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64))
    assert qa_config(None, small).max_length == 64 and qa_config(48, small).max_length == 48


def test_finetune_prune_eval_through_the_cli(tiny_qa_dir, tmp_path, capsys):
    from compress.cli import main

    data = ["--data-dir", str(FIXTURES), "--max-seq-length", "48", "--batch-size", "8"]
    ft, pruned, out = tmp_path / "ft", tmp_path / "pruned", tmp_path / "eval.json"
    assert main(["finetune", "--model", str(tiny_qa_dir), "--task", "squad_v2", "--max-steps", "2",
                 "-o", str(ft), *data]) == 0
    summary = json.loads((ft / "finetune.json").read_text())
    assert summary["task"] == "squad_v2" and summary["steps"] == 2 and summary["windows"] > 21
    assert main(["prune", "--model", str(ft), "--task", "squad_v2", "--flops", "0.5", "--num-samples", "16",
                 "-o", str(pruned), *data]) == 0
    record = json.loads((pruned / "prune.json").read_text())
    assert record["flops_ratio"] <= 0.5 + 1e-6 and sum(record["num_attention_heads_per_layer"]) < 8
    config = json.loads((pruned / "config.json").read_text())
    assert config["architectures"] == ["BertForQuestionAnswering"]
    assert main(["eval", str(pruned), "--task", "squad_v2", "--data-dir", str(FIXTURES), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["metrics"]["total"] == 15 and result["metrics"]["NoAns_total"] == 4
    assert set(result["predictions"]) == {ex["id"] for ex in load_squad("squad_v2", "dev", FIXTURES)}
    assert "HasAns_f1" in capsys.readouterr().out


def test_cli_errors_for_qa(tiny_qa_dir, tmp_path, capsys):
    from compress.cli import main

    no_head = tmp_path / "encoder"
    tiny_qa_model(len(fixture_tokenizer())).base_model.save_pretrained(no_head)
    fixture_tokenizer().save_pretrained(no_head)
    assert main(["eval", str(no_head), "--task", "squad", "--data-dir", str(FIXTURES)]) == 2
    assert "no question-answering head" in capsys.readouterr().err
    assert main(["eval", str(tiny_qa_dir), "--task", "squad", "--data-dir", str(tmp_path)]) == 2
    assert "dev split not found" in capsys.readouterr().err
