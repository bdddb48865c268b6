"""Learned token pruning (compress/token_pruning): exactness of the token-dropping forward, FLOPs
accounting, save/load, and the `compress token-prune` command on tiny seeded random encoders."""

from __future__ import annotations

import json

import pytest
import torch

from _tiny import KINDS, save_tiny_model_dir, tiny_config, tiny_inputs, tiny_model, tiny_tokenizer, write_tiny_sst2
from compress.cli import main
from compress.token_pruning import checkpoint, flops
from compress.token_pruning.model import PruningSpec, TokenPruningModel


def deep_model(kind: str, num_layers: int = 4, seed: int = 0):
    """The tiny encoder with more layers, so that pruning happens at several depths."""
    from transformers import AutoModelForSequenceClassification

    config = tiny_config(kind)
    setattr(config, "n_layers" if kind == "distilbert" else "num_hidden_layers", num_layers)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():  # as in _tiny.tiny_model: weights large enough for peaked attention
        for name, p in model.named_parameters():
            if "LayerNorm" not in name and "layer_norm" not in name:
                p.normal_(0, 0.2)
    return model.eval()


def long_inputs(seed: int = 1):
    inputs = tiny_inputs(batch=4, seq=20, seed=seed)
    inputs["attention_mask"][2, 11:] = 0
    return inputs


# Mean importance is 1 / (kept length), ~0.05-0.09 for these inputs: these thresholds drop real shares.
DROPPING = [0.045, 0.055, 0.065]


def model_layers(model):
    from compress.token_pruning.parts import layer_parts

    return layer_parts(model)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_thresholds_equal_dense_model(kind):
    model = deep_model(kind)
    inputs = long_inputs()
    with torch.no_grad():
        reference = model(**inputs).logits
        pruner = TokenPruningModel(model, PruningSpec(thresholds=[0.0, 0.0, 0.0])).eval()
        for mode in ("drop", "masked", "dense"):
            out = pruner(**inputs, mode=mode)
            torch.testing.assert_close(out.logits, reference, rtol=1e-5, atol=1e-5)
            assert out.num_tokens.tolist() == [[float(n)] * 4 for n in inputs["attention_mask"].sum(1)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rule", ["threshold", "topk"])
def test_masked_formulation_equals_token_dropping(kind, rule):
    model = deep_model(kind)
    inputs = long_inputs()
    if rule == "threshold":
        spec = PruningSpec(thresholds=DROPPING)
    else:
        spec = PruningSpec("topk", keep_ratios=[0.8, 0.6, 0.3])
    pruner = TokenPruningModel(model, spec).eval()
    with torch.no_grad():
        masked, dropped = pruner(**inputs, mode="masked"), pruner(**inputs, mode="drop")
        dense = pruner(**inputs, mode="dense")
    assert (dropped.num_tokens[:, -1] < dropped.num_tokens[:, 0]).sum() >= 2, "the case must really drop tokens"
    assert not torch.allclose(dropped.logits, dense.logits, atol=1e-3), "dropping must change the output"
    torch.testing.assert_close(dropped.logits, masked.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(dropped.num_tokens, masked.num_tokens)


@pytest.mark.parametrize("kind", ["bert", "mpnet"])
def test_soft_mask_at_tiny_temperature_is_the_hard_mask(kind):
    model = deep_model(kind)
    inputs = long_inputs()
    spec = PruningSpec(thresholds=DROPPING, temperature=1e-9)
    pruner = TokenPruningModel(model, spec).eval()
    with torch.no_grad():
        soft, masked = pruner(**inputs, mode="soft"), pruner(**inputs, mode="masked")
    torch.testing.assert_close(soft.logits, masked.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(soft.num_tokens, masked.num_tokens)


def test_kept_lengths_never_increase_cls_kept_padding_not_counted():
    model = deep_model("bert", num_layers=6)
    inputs = long_inputs()
    spec = PruningSpec(thresholds=[0.02, 0.04, 0.06, 0.08, 0.5])  # the last one drops all but [CLS]
    out = TokenPruningModel(model, spec).eval()(**inputs)
    tokens = out.num_tokens
    assert torch.equal(tokens[:, 0], inputs["attention_mask"].sum(1).float())
    assert (tokens[:, 1:] <= tokens[:, :-1]).all()
    assert (tokens[:, -1] == 1).all()  # only [CLS] survives a threshold of 0.5 here
    assert (tokens[:, 2] < tokens[:, 0]).any()


def test_soft_stage_gradient_raises_thresholds_under_the_mask_loss():
    model = deep_model("roberta")
    pruner = TokenPruningModel(model, PruningSpec(thresholds=[0.03, 0.05, 0.07], temperature=1e-2))
    out = pruner(**long_inputs(), mode="soft")
    out.mask_mean.backward()
    assert (pruner.thresholds.grad < 0).all()  # a higher threshold keeps fewer tokens
    assert 0 < float(out.mask_mean.detach()) < 1


def test_flops_match_hand_count():
    shape = flops.EncoderShape(hidden_size=4, head_dim=2, num_heads=(2, 1), num_filters=(8, 0))
    parent = flops.EncoderShape(hidden_size=4, head_dim=2, num_heads=(2, 2), num_filters=(8, 8))
    tokens = torch.tensor([[3.0, 2.0]])
    # layer 0, n=3: heads 2*(4*3*4*2 + 2*9*2) = 264, filters 8*2*3*4 = 192 -> 2*(264+192) = 912
    # layer 1, n=2: heads 1*(4*2*4*2 + 2*4*2) = 80, filters 0 -> 160; parent on n=3: 2 * 912
    assert flops.example_flops(tokens, shape).tolist() == [1072.0]
    assert flops.flops_ratio(tokens, shape, parent).tolist() == [pytest.approx(1072 / 1824)]


def test_flops_agree_with_the_head_filter_cost_model():
    from compress.arch import get_adapter
    from compress.pruning.cost import flops_model

    model = tiny_model("bert")
    adapter = get_adapter(model)
    adapter.slim_layer(0, [0, 2, 3], torch.arange(40))
    cost = flops_model(adapter, seq_len=17)
    expected = cost.flops_counts(adapter.num_heads(), adapter.num_filters())
    ours = flops.example_flops(torch.full((1, 2), 17.0), flops.model_shape(model))
    assert float(ours) == pytest.approx(expected)


@pytest.mark.parametrize("kind", ["bert", "mpnet"])
def test_slimmed_uneven_heads_run_and_count(kind):
    from compress.arch import get_adapter

    model = tiny_model(kind)
    adapter = get_adapter(model)
    adapter.slim_layer(0, [1, 3], torch.arange(50))
    adapter.slim_layer(1, [], torch.arange(128))  # a layer with no heads at all
    inputs = tiny_inputs()
    pruner = TokenPruningModel(model, PruningSpec(thresholds=[0.0])).eval()
    with torch.no_grad():
        torch.testing.assert_close(pruner(**inputs).logits, model(**inputs).logits, rtol=1e-4, atol=1e-4)
    shape = flops.model_shape(model)
    assert shape.num_heads == (2, 0) and shape.num_filters == (50, 128)


@pytest.mark.parametrize("kind", ["bert", "mpnet"])
def test_save_load_round_trip(tmp_path, kind):
    from compress.arch import get_adapter

    model = tiny_model(kind)
    adapter = get_adapter(model)
    adapter.slim_layer(0, [0, 3], torch.arange(64))
    adapter.record_shapes()
    pruner = TokenPruningModel(model, PruningSpec(thresholds=[0.07], temperature=5e-4)).eval()
    checkpoint.save(pruner, tiny_tokenizer(), tmp_path, {"note": "test"})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["token_pruning"]["thresholds"] == [pytest.approx(0.07)]
    loaded = checkpoint.load(tmp_path)
    assert isinstance(loaded, TokenPruningModel) and loaded.spec.temperature == 5e-4
    inputs = tiny_inputs(seq=14)
    with torch.no_grad():
        a, b = pruner(**inputs), loaded(**inputs)
    torch.testing.assert_close(a.logits, b.logits)
    assert torch.equal(a.num_tokens, b.num_tokens)


def _cli(*args) -> int:
    return main(["token-prune", *map(str, args)])


@pytest.fixture
def tiny_run(tmp_path):
    model_dir = save_tiny_model_dir(tmp_path / "model")
    data_dir = write_tiny_sst2(tmp_path / "data", num_train=32, num_dev=16)
    return model_dir, data_dir, tmp_path / "out"


def test_cli_end_to_end(tiny_run, capsys):
    model_dir, data_dir, out = tiny_run
    code = _cli("--model", model_dir, "--task", "sst2", "-o", out, "--data-dir", data_dir, "--max-steps", 2,
                "--batch-size", 8, "--lambda", 0.5, "--temperature", 0.01)
    assert code == 0
    record = json.loads((out / "token_prune.json").read_text())
    assert [s["steps"] for s in record["stages"]] == [2, 2]
    assert 0 < record["dev_after"]["flops_ratio"] <= 1.0 and record["dev_before"]["flops_ratio"] == 1.0
    assert isinstance(checkpoint.load(out), TokenPruningModel)
    assert "FLOPs ratio" in capsys.readouterr().out
    from compress.token_pruning.pipeline import evaluate_dir

    result = evaluate_dir(out, "sst2", data_dir)  # what `compress eval` reports for token-pruned models
    assert result["accuracy"] == pytest.approx(record["dev_after"]["accuracy"])
    assert result["flops_ratio"] == pytest.approx(record["dev_after"]["flops_ratio"]) and result["num_examples"] == 16


@pytest.mark.parametrize("flag, value", [("--lambda", -0.1), ("--temperature", 0), ("--final-threshold", 1.5),
                                         ("--final-threshold", -0.01), ("--lambda", "nan")])
def test_cli_rejects_out_of_range_settings(tiny_run, capsys, flag, value):
    model_dir, data_dir, out = tiny_run
    capsys.readouterr()
    assert _cli("--model", model_dir, "--task", "sst2", "-o", out, "--data-dir", data_dir, flag, value) == 2
    err = capsys.readouterr().err
    assert flag in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_rejects_bad_models(tmp_path, capsys):
    data_dir = write_tiny_sst2(tmp_path / "data", num_train=8, num_dev=8)
    three = save_tiny_model_dir(tmp_path / "three", num_labels=3)
    headless = save_tiny_model_dir(tmp_path / "headless", with_head=False)
    decoder = tmp_path / "decoder"
    decoder.mkdir()
    (decoder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    capsys.readouterr()  # drop the fixtures' own progress output
    for model_dir, message in ((three, "label"), (headless, "classification head"), (decoder, "encoder")):
        out = tmp_path / f"out-{model_dir.name}"
        assert _cli("--model", model_dir, "--task", "sst2", "-o", out, "--data-dir", data_dir) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
        assert not out.exists() and not list(tmp_path.glob(f".out-{model_dir.name}*"))


@pytest.fixture
def saved_pruned(tmp_path):
    pruner = TokenPruningModel(tiny_model("bert"), PruningSpec(thresholds=[0.08])).eval()
    checkpoint.save(pruner, tiny_tokenizer(), tmp_path / "tp", {})
    return tmp_path / "tp", write_tiny_sst2(tmp_path / "data", num_train=8, num_dev=8)


def test_compress_load_returns_the_token_dropping_model(saved_pruned):
    import compress

    assert isinstance(compress.load(saved_pruned[0]), TokenPruningModel)


def test_compress_eval_reports_flops_ratio(saved_pruned, capsys):
    path, data_dir = saved_pruned
    capsys.readouterr()
    assert main(["eval", str(path), "--task", "sst2", "--data-dir", str(data_dir)]) == 0
    assert "flops_ratio" in capsys.readouterr().out


def test_token_prune_recipes_resolve():
    from pathlib import Path

    from compress.recipes import load_recipe, resolve
    from compress.token_pruning import TokenPruningConfig

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*token-prune*.yaml"))
    assert recipes
    for recipe in recipes:
        config = resolve(TokenPruningConfig, load_recipe(recipe), mask_lambda=0.2)
        assert config.mask_lambda == 0.2 and config.task
