"""`compress distill` on tiny seeded Gemma 2 and Gemma 3 models (tests/test_gemma_prune.py builds them):
a few steps lower the held-out KL to the teacher; the output loads in `compress.load` and in `serve` with equal
greedy tokens; an interrupted and resumed run ends where the uninterrupted one does; `compress prune
--distill-tokens` does both; bad inputs end with one line and exit code 2, nothing written."""

from __future__ import annotations

import json

import pytest
import torch

from compress.arch.gemma import GemmaAdapter
from compress.cli import main
from compress.distill.config import DistillConfig
from compress.distill.trainer import Trainer, distill
from test_gemma_prune import WORDS, _gqa_masks, _model, _tokenizer


def _text(path, words: int = 1200, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    path.write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (words,), generator=g)))
    return path


def _pair(root, kind: str):
    """(teacher dir, student dir): a tiny dense Gemma and a slimmed copy (GQA masks of test_gemma_prune)."""
    from compress.models import checkpoint
    from compress.pruning.slim import slim_model

    teacher, tok = _model(kind), _tokenizer()
    checkpoint.save(teacher, tok, root / "teacher")
    student = _model(kind)
    heads, filters = _gqa_masks(GemmaAdapter(student))
    slim_model(GemmaAdapter(student), [(m != 0).float() for m in heads], [(m != 0).float() for m in filters])
    checkpoint.save(student, tok, root / "student", {"method": "test"})
    return root / "teacher", root / "student"


def _config(root, out, **kw) -> DistillConfig:
    settings = dict(student=str(root / "student"), teacher=str(root / "teacher"), output=str(out),
                    calib=str(_text(root / "t.txt")), tokens=8 * 4 * 16, seq_len=16, batch_size=4, lr=3e-3,
                    eval_windows=4, eval_every=4, sample=False, device="cpu")
    return DistillConfig(**{**settings, **kw})


@pytest.fixture(params=["gemma2", "gemma3"])
def pair(request, tmp_path):
    _pair(tmp_path, request.param)
    return tmp_path


def test_a_few_steps_lower_the_heldout_kl(pair):
    record = distill(_config(pair, pair / "out"), progress=False)
    first, last = record["history"][0], record["history"][-1]
    assert record["complete"] and record["steps_done"] == 8 and last["tokens"] == 8 * 64
    assert last["kl"] < 0.8 * first["kl"]
    saved = json.loads((pair / "out" / "distill.json").read_text())
    assert saved["history"] == record["history"] and not (pair / "out" / "training_state.pt").exists()
    assert json.loads((pair / "out" / "prune.json").read_text()) == {"method": "test"}


def test_distilled_checkpoint_loads_in_compress_and_serve(pair):
    import compress
    from serve import LLM, SamplingParams
    from serve_fixtures import hf_greedy

    distill(_config(pair, pair / "out", tokens=2 * 64), progress=False)
    model = compress.load(pair / "out")
    assert GemmaAdapter(model).num_kv_heads() == [2, 1]
    prompt = [2, 5, 9, 11, 7]
    out = LLM(pair / "out", block_size=4).generate([prompt], SamplingParams(temperature=0, max_tokens=6,
                                                                           ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_greedy(model, prompt, 6)


def test_interrupt_and_resume_equal_an_uninterrupted_run(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from compress.errors import UserError

    _pair(tmp_path, "gemma3")
    whole = distill(_config(tmp_path, tmp_path / "whole", save_every=1), progress=False)
    step = Trainer.train_step

    def stop_at_5(self, ids):
        if self.step == 5:
            raise KeyboardInterrupt
        return step(self, ids)

    monkeypatch.setattr(Trainer, "train_step", stop_at_5)
    with pytest.raises(KeyboardInterrupt):
        distill(_config(tmp_path, tmp_path / "cut", save_every=2), progress=False)
    partial = json.loads((tmp_path / "cut" / "distill.json").read_text())
    assert partial["steps_done"] == 4 and not partial["complete"]
    assert (tmp_path / "cut" / "training_state.pt").is_file()
    monkeypatch.setattr(Trainer, "train_step", step)
    with pytest.raises(UserError, match="settings other than the checkpoint's: tokens 512 -> 1024"):
        distill(_config(tmp_path, tmp_path / "cut", save_every=2, resume=True, tokens=1024), progress=False)
    resumed = distill(_config(tmp_path, tmp_path / "cut", save_every=2, resume=True), progress=False)
    assert resumed["history"] == whole["history"]
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    again = distill(_config(tmp_path, tmp_path / "cut", save_every=2, resume=True), progress=False)
    assert again["steps_done"] == 8  # finished: nothing to resume


def test_prune_with_distill_tokens_does_both(tmp_path, capsys):
    model, tok = _model("gemma3"), _tokenizer()
    model.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    text, out = _text(tmp_path / "c.txt"), tmp_path / "out"
    assert main(["prune", "--model", str(tmp_path / "dense"), "--flops", "0.6", "--calib", str(text), "-o", str(out),
                 "--num-samples", "8", "--seq-len", "16", "--context-len", "32", "--device", "cpu",
                 "--distill-tokens", "128", "--distill-seq-len", "16", "--distill-batch-size", "4"]) == 0
    record = json.loads((out / "distill.json").read_text())
    assert record["complete"] and record["tokens_done"] == 128 and record["teacher"] == str(tmp_path / "dense")
    assert json.loads((out / "prune.json").read_text())["flops_ratio"] <= 0.6 + 1e-9
    assert "held-out perplexity" in capsys.readouterr().out


def test_out_of_memory_names_the_flag(pair, monkeypatch):
    from compress.errors import UserError

    def oom(self, ids):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(Trainer, "train_step", oom)
    with pytest.raises(UserError, match="lower --batch-size.*--activation-checkpointing"):
        distill(_config(pair, pair / "out"), progress=False)
    assert not (pair / "out").exists()


def _bad_dirs(root):
    """Directories for the bad-input cases: another vocabulary, another family, a student bigger than the teacher."""
    from transformers import AutoModelForCausalLM

    from _tiny import save_tiny_model_dir
    from test_gemma_prune import _config as tiny_config

    config = tiny_config("gemma3")
    config.vocab_size += 8
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "vocab")
    _tokenizer().save_pretrained(root / "vocab")
    _model("gemma2").save_pretrained(root / "gemma2")
    _tokenizer().save_pretrained(root / "gemma2")
    save_tiny_model_dir(root / "bert", "bert")
    (root / "empty.txt").write_text("\n")
    (root / "short.txt").write_text("the king of the north")
    (root / "broken").mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (root / "broken" / name).write_bytes((root / "student" / name).read_bytes())
    (root / "broken" / "model.safetensors").write_bytes((root / "student" / "model.safetensors").read_bytes()[:100])
    (root / "halfdone").mkdir()
    (root / "halfdone" / "training_state.pt").write_bytes(b"PK\x03\x04 not a checkpoint")


@pytest.mark.parametrize("change, match", [
    ({"--teacher": "vocab"}, "differ in vocab_size"),
    ({"--teacher": "gemma2"}, "differ in model_type"),
    ({"student": "teacher", "--teacher": "student"}, "not a shape the pruner makes"),
    ({"student": "bert"}, "not a Gemma"),
    ({"--calib": "empty.txt"}, "is empty"),
    ({"--calib": "short.txt"}, "fewer than 5 windows"),
    ({"--tokens": "0"}, "--tokens must be at least 1"),
    ({"student": "broken"}, "corrupt or incomplete"),
    ({"-o": "halfdone", "--resume": None}, "unreadable"),
])
def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys, change, match):
    _pair(tmp_path, "gemma3")
    _bad_dirs(tmp_path)
    args = {"student": "student", "--teacher": "teacher", "-o": "out", "--calib": str(_text(tmp_path / "t.txt")),
            "--tokens": "64", "--seq-len": "16", "--batch-size": "4", "--device": "cpu", "--no-sample": None,
            **change}
    path = lambda v: str(tmp_path / v) if v and (tmp_path / v).exists() or v in ("out",) else v  # noqa: E731
    argv = ["distill", path(args.pop("student"))]
    for flag, value in args.items():
        argv += [flag] if value is None else [flag, path(value) if flag in ("--teacher", "-o", "--calib") else value]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_compare_matches_perplexity_and_is_zero_against_itself(kind="gemma2"):
    from compress.data.perplexity import perplexity
    from compress.distill.loss import compare
    from test_gemma_prune import _ids

    model, windows = _model(kind), _ids(5, 16)
    result = compare(model, model, windows, 2)
    assert result["perplexity"] == pytest.approx(perplexity(model, windows, 2)["perplexity"], rel=1e-5)
    assert result["kl"] == pytest.approx(0.0, abs=1e-6) and result["agreement"] == 1.0 and result["num_tokens"] == 75
