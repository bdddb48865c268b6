"""Depth pruning (compress.pruning.depth, `compress prune --drop-layers N`) on tiny seeded Gemma 2 / Gemma 3 decoders.

Invariants: a layer left with 0 heads and 0 filters is exactly the identity on the residual stream (Gemma's
sandwich norms turn an empty branch into post_norm(0) = 0); block influence ranks a layer that does nothing last
and the greedy KL search drops it first; the slimmed model equals the masked model and loads back; the
runtime skips the dropped layers (no KV cache, no launch) and gives `compress.load`'s greedy tokens, on the
reference path and on the fast path.
"""

from __future__ import annotations

import json

import pytest
import torch

from compress.arch.gemma import GemmaAdapter, load_causal_lm
from compress.errors import UserError
from compress.pruning import depth
from compress.pruning.config import PruneConfig
from compress.pruning.pipeline import Pipeline
from compress.pruning.slim import slim_model
from serve import LLM, SamplingParams
from serve_fixtures import build_tokenizer, gemma2_config, gemma3_config, hf_greedy, random_model, random_prompts

NUM_LAYERS = 4


def _model(kind: str, seed: int = 0):
    return random_model((gemma2_config if kind == "gemma2" else gemma3_config)(NUM_LAYERS), seed=seed)


def _ids(n=2, length=14, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 300, (n, length), generator=g)


@pytest.fixture(params=["gemma2", "gemma3"])
def kind(request):
    return request.param


def test_an_empty_layer_is_the_identity_on_the_residual_stream(kind):
    model = _model(kind)
    adapter = GemmaAdapter(model)
    heads, filters = depth.depth_masks((adapter.num_heads(), None, adapter.num_filters()), [1])
    slim_model(adapter, heads, filters)
    seen = {}
    block = adapter.layer_modules()[1]
    block.register_forward_hook(lambda m, args, kwargs, out: seen.update(x=args[0] if args else kwargs["hidden_states"],
                                                                         y=out[0] if isinstance(out, tuple) else out),
                                with_kwargs=True)
    with torch.no_grad():
        model(input_ids=_ids())
    assert adapter.num_heads()[1] == 0 and adapter.num_filters()[1] == 0
    assert torch.equal(seen["x"], seen["y"])


def test_both_criteria_find_a_layer_that_does_nothing(kind):
    model = _model(kind)
    adapter = GemmaAdapter(model)
    with torch.no_grad():  # post-norm weight -1: scale 1 + w = 0, both branches add exactly 0
        for norm in ("post_attention_layernorm", "post_feedforward_layernorm"):
            getattr(adapter.layer_modules()[2], norm).weight.fill_(-1.0)
    batches = [{"input_ids": _ids(seed=s)} for s in range(2)]
    influence = depth.block_influence(adapter, batches, torch.device("cpu"), progress=False)
    assert influence.shape == (NUM_LAYERS,) and abs(float(influence[2])) < 1e-6
    assert (influence[[0, 1, 3]] > 1e-3).all()
    parent = (adapter.num_heads(), adapter.num_kv_heads(), adapter.num_filters())
    assert depth.layers_to_drop(influence, 1, parent) == [2]
    with pytest.raises(UserError, match="cannot drop 4"):
        depth.layers_to_drop(influence, NUM_LAYERS, parent)
    dropped, trace = depth.greedy_kl(adapter, batches, torch.device("cpu"), 2, parent, progress=False)
    assert dropped[0] == 2 and trace[0] < 1e-9 < trace[1]


def test_already_empty_layers_are_not_chosen_again():
    influence = torch.tensor([0.5, 0.0, 0.2, 0.3])
    parent = ([4, 0, 4, 4], [2, 0, 2, 2], [96, 0, 96, 96])
    assert depth.empty_layers(parent) == [1]
    assert depth.layers_to_drop(influence, 2, parent) == [2, 3]


def _calib_text(tmp_path):
    g = torch.Generator().manual_seed(0)
    words = "the quick brown fox jumps over the lazy dog hello world serving paged attention".split()
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (800,), generator=g)))
    return text


def _prune(kind, tmp_path, **settings):
    model = _model(kind, seed=5)
    src = tmp_path / "dense"
    model.save_pretrained(src)
    build_tokenizer().save_pretrained(src)
    config = PruneConfig(model=str(src), output=str(tmp_path / "depth"), drop_layers=2, calib=str(_calib_text(tmp_path)),
                         num_samples=8, seq_len=16, context_len=32, batch_size=4, device="cpu", **settings)
    pipe = Pipeline(config, progress=False)
    return model, pipe


@pytest.mark.parametrize("method", ["greedy-kl", "block-influence"])
def test_depth_pruned_slimmed_model_equals_the_masked_model_and_loads_back(kind, tmp_path, method):
    dense, pipe = _prune(kind, tmp_path, tune=False, method=method)
    pruned, tok = pipe.prune()
    dropped = pipe.record["dropped_layers"]
    assert pipe.record["method"] == method and pipe.record["constraint"] == {"drop_layers": 2}
    found = pipe.record["block_influence"] if method == "block-influence" else pipe.record["greedy_kl"]
    assert len(dropped) == 2 and len(found) == (NUM_LAYERS if method == "block-influence" else 2)
    heads, filters = depth.depth_masks((GemmaAdapter(dense).num_heads(), None, GemmaAdapter(dense).num_filters()),
                                       dropped)
    ids = _ids()
    with torch.no_grad(), GemmaAdapter(dense).masks(heads, filters):
        masked = dense(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=ids).logits, masked, rtol=1e-5, atol=1e-5)
    pipe.save(pruned, tok)
    saved = json.loads((tmp_path / "depth" / "config.json").read_text())
    assert [i for i, (h, f) in enumerate(zip(saved["num_attention_heads_per_layer"],
                                             saved["intermediate_size_per_layer"])) if h == 0 and f == 0] == dropped
    with torch.no_grad():
        torch.testing.assert_close(load_causal_lm(tmp_path / "depth")(input_ids=ids).logits, masked,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fast_path", ["off", "on"])
def test_serve_skips_dropped_layers_and_matches_compress_load(kind, tmp_path, fast_path):
    import compress

    _, pipe = _prune(kind, tmp_path)  # tuned: the kept layers' scales differ from the parent's
    pipe.run()
    assert pipe.record["method"] == "greedy-kl"  # the default with --drop-layers
    dropped = pipe.record["dropped_layers"]
    reference = compress.load(tmp_path / "depth")
    prompts = random_prompts([5, 19, 11], seed=3)
    expected = [hf_greedy(reference, p, 8) for p in prompts]
    llm = LLM(tmp_path / "depth", block_size=4, max_num_batched_tokens=16, fast_path=fast_path, device="cpu")
    runner = llm.engine.runner
    assert runner.model.layer_ids == [i for i in range(NUM_LAYERS) if i not in dropped]
    assert all(runner.kv_caches[i] is None for i in dropped)
    for i in dropped:  # never run
        runner.model.model.layers[i].forward = runner.model.model.layers[i].forward_fused = None
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outputs] == expected


@pytest.mark.parametrize("settings, match", [
    ({"drop_layers": 2, "flops": 0.5}, "not both"),
    ({"method": "block-influence", "flops": 0.5}, "needs --drop-layers"),
    ({"drop_layers": 2, "method": "fisher"}, "chooses layers by greedy-kl or block-influence"),
    ({"drop_layers": 0}, "at least 1"),
])
def test_bad_depth_settings_are_user_errors(settings, match):
    with pytest.raises(UserError, match=match):
        PruneConfig(model="m", output="o", **settings).for_family("decoder")


def test_cli_drop_layers_writes_a_depth_pruned_decoder(tmp_path, capsys):
    from compress.cli import main

    _model("gemma3", seed=5).save_pretrained(tmp_path / "dense")
    build_tokenizer().save_pretrained(tmp_path / "dense")
    out = tmp_path / "out"
    assert main(["prune", "--model", str(tmp_path / "dense"), "--drop-layers", "1", "--calib", str(_calib_text(tmp_path)),
                 "-o", str(out), "--num-samples", "4", "--seq-len", "16", "--device", "cpu"]) == 0
    record = json.loads((out / "prune.json").read_text())
    assert record["method"] == "greedy-kl" and len(record["dropped_layers"]) == 1 and record["flops_ratio"] < 1
    assert "greedy-kl, {'drop_layers': 1}" in capsys.readouterr().out


def test_too_many_layers_to_drop_is_refused_before_calibration(tmp_path, monkeypatch):
    """Dropping every layer is a one-line error before any calibration text is read or sampled."""
    from compress.data import calib

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration ran before the layer count was checked")

    monkeypatch.setattr(calib, "resolve_calibration", no_calibration)
    _, pipe = _prune("gemma3", tmp_path)
    pipe.config.drop_layers = NUM_LAYERS
    with pytest.raises(UserError, match=f"cannot drop {NUM_LAYERS} of the {NUM_LAYERS} non-empty layers"):
        pipe.prune()
