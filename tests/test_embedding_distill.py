"""Recovery of a pruned sentence-embedding encoder by distillation from its dense parent (compress.distill.embedding).

On a tiny seeded sentence-transformers directory and a slimmed copy of it: training lowers the held-out
embedding-matching loss, the student keeps its slimmed shapes and pooling files, the output is written whole
(a failed run leaves no directory), `compress prune --objective embedding --distill-steps` distils in place,
and bad settings are one-line errors.
"""

from __future__ import annotations

import json

import pytest
import torch
from encoder_fixtures import st_dir
from test_embedding_prune import write_calib

HEADS, FILTERS = [2, 1], [40, 24]  # the slimmed student's shape (the tiny parent: 4 heads, 128 filters a layer)


def slimmed(tmp_path, kind: str = "bert"):
    """(parent, student): a tiny embedding model and a copy slimmed to HEADS and FILTERS."""
    from compress.arch import get_adapter
    from compress.embeddings.model import load_embedder
    from compress.models import checkpoint
    from compress.pruning.slim import slim_model

    parent = st_dir(tmp_path / "parent", kind, "mean")
    embedder, tok = load_embedder(parent)
    heads = [torch.tensor([1.0] * h + [0.0] * (4 - h)) for h in HEADS]
    filters = [torch.tensor([1.0] * f + [0.0] * (128 - f)) for f in FILTERS]
    slim_model(get_adapter(embedder.encoder), heads, filters)
    checkpoint.save(embedder.encoder, tok, tmp_path / "student", source_dir=parent)
    return parent, tmp_path / "student"


def config(tmp_path, student, parent, **settings):
    from compress.distill.embed_config import EmbedDistillConfig

    base = {"student": str(student), "teacher": str(parent), "output": str(tmp_path / "out"), "steps": 30,
            "batch_size": 8, "lr": 1e-3, "warmup": 0.1, "calib": str(write_calib(tmp_path / "calib.txt")), "device": "cpu"}
    return EmbedDistillConfig(**{**base, **settings})


@pytest.mark.parametrize("kind", ["bert", "mpnet"])
def test_distillation_lowers_the_loss_and_keeps_the_shapes(tmp_path, kind):
    from compress.arch import get_adapter
    from compress.distill.embedding import distill_embedding
    from compress.embeddings.model import load_embedder

    parent, student = slimmed(tmp_path, kind)
    torch.manual_seed(0)
    record = distill_embedding(config(tmp_path, student, parent), progress=False)
    first, last = record["history"][0], record["history"][-1]
    assert record["steps_done"] == 30 and last["loss"] < 0.7 * first["loss"]
    out = tmp_path / "out"
    embedder, _ = load_embedder(out)
    adapter = get_adapter(embedder.encoder)
    assert adapter.num_heads() == HEADS and adapter.num_filters() == FILTERS
    assert json.loads((out / "config.json").read_text())["num_attention_heads_per_layer"] == HEADS
    for name in ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json"):
        assert (out / name).read_text() == (parent / name).read_text()
    assert json.loads((out / "distill.json").read_text())["settings"]["steps"] == 30
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_the_loss_is_zero_for_the_teacher_and_grows_with_the_difference():
    from compress.distill.embedding import embedding_loss

    t = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    assert float(embedding_loss(t, t, 1.0)[0]) == 0.0
    near, far = (torch.nn.functional.normalize(t + s * torch.randn(6, 16), dim=-1) for s in (0.05, 0.5))
    assert 0 < float(embedding_loss(near, t, 1.0)[0]) < float(embedding_loss(far, t, 1.0)[0])


def test_the_token_embeddings_stay_the_teachers(tmp_path):
    from compress.distill.embedding import distill_embedding
    from compress.embeddings.model import load_embedder

    parent, student = slimmed(tmp_path)
    distill_embedding(config(tmp_path, student, parent, steps=3), progress=False)
    before, after = (load_embedder(p)[0].encoder.get_input_embeddings().weight for p in (student, tmp_path / "out"))
    assert torch.equal(before, after)


def test_a_failed_run_writes_nothing(tmp_path, monkeypatch):
    from compress.distill import embedding

    parent, student = slimmed(tmp_path)

    def fail(*args, **kwargs):
        raise RuntimeError("stop")

    monkeypatch.setattr("compress.models.checkpoint.save", fail)
    with pytest.raises(RuntimeError, match="stop"):
        embedding.distill_embedding(config(tmp_path, student, parent, steps=2), progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_prune_then_distill_in_place(tmp_path, capsys):
    from compress.cli import main

    parent = st_dir(tmp_path / "parent", "bert", "mean")
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(parent), "--objective", "embedding", "--flops", "0.5", "--num-samples", "16",
                 "--calib", str(write_calib(tmp_path / "calib.txt")), "--distill-steps", "4", "--distill-batch-size",
                 "4", "-o", str(out), "--device", "cpu"]) == 0
    assert "held-out loss" in capsys.readouterr().out
    record, pruned = (json.loads((out / f).read_text()) for f in ("distill.json", "prune.json"))
    assert record["steps_done"] == 4 and record["settings"]["batch_size"] == 4 and pruned["flops_ratio"] <= 0.5


def test_the_distill_command_takes_an_encoder_student(tmp_path, capsys):
    from compress.cli import main

    parent, student = slimmed(tmp_path)
    assert main(["distill", str(student), "--teacher", str(parent), "-o", str(tmp_path / "out"), "--steps", "3",
                 "--batch-size", "4", "--relational", "2", "--max-seq-length", "16", "--device", "cpu",
                 "--calib", str(write_calib(tmp_path / "calib.txt"))]) == 0
    assert "3 steps, 12 passages" in capsys.readouterr().out
    settings = json.loads((tmp_path / "out" / "distill.json").read_text())["settings"]
    assert (settings["relational"], settings["max_seq_length"]) == (2.0, 16)


@pytest.mark.parametrize("settings, message", [
    ({"steps": 0}, "--steps must be at least 1"),
    ({"batch_size": 1}, "--batch-size must be at least 2"),
    ({"lr": 0.0}, "need --lr > 0"),
    ({"relational": -1.0}, "--relational must be >= 0"),
    ({"calib": " "}, "--calib is empty"),
    ({"teacher": ""}, "give the student, --teacher PARENT"),
])
def test_settings_are_checked(settings, message):
    from compress.distill.embed_config import EmbedDistillConfig
    from compress.errors import UserError

    base = {"student": "s", "teacher": "t", "output": "o", "device": "cpu"}
    with pytest.raises(UserError, match=message):
        EmbedDistillConfig(**{**base, **settings}).validate()


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "100"], "--tokens applies to a Gemma student"),
    (["--seq-len", "64"], "--seq-len applies to a Gemma student"),
    (["--steps", "0"], "--steps must be at least 1"),
])
def test_the_cli_refuses_bad_settings_in_one_line(tmp_path, capsys, argv, message):
    from compress.cli import main

    parent, student = slimmed(tmp_path)
    capsys.readouterr()
    assert main(["distill", str(student), "--teacher", str(parent), "-o", str(tmp_path / "out"), *argv]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_teacher_of_another_shape_is_refused(tmp_path):
    from compress.distill.embedding import distill_embedding
    from compress.errors import UserError

    _, student = slimmed(tmp_path)
    other = st_dir(tmp_path / "other", "mpnet", "mean")
    with pytest.raises(UserError, match="differ in model_type"):
        distill_embedding(config(tmp_path, student, other, steps=1), progress=False)


def test_distill_steps_needs_the_embedding_objective():
    from compress.errors import UserError
    from compress.pruning.config import PruneConfig

    with pytest.raises(UserError, match="--distill-steps applies to --objective embedding"):
        PruneConfig(model="m", output="o", flops=0.5, family="encoder", task="sst2", distill_steps=10).validate()
