"""Mask tuning lowers each layer's reconstruction error (and never raises it)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from compress.pruning import tune  # noqa: E402
from compress.arch import get_adapter  # noqa: E402
from _tiny import KINDS, tiny_inputs, tiny_model  # noqa: E402


def _batches():
    return [dict(tiny_inputs(6, 12, seed=s), labels=torch.zeros(6, dtype=torch.long)) for s in range(2)]


def _half_masks(adapter):
    g = torch.Generator().manual_seed(3)
    heads = [(torch.rand(h, generator=g) < 0.5).float() for h in adapter.num_heads()]
    filters = [(torch.rand(f, generator=g) < 0.5).float() for f in adapter.num_filters()]
    heads[0][0] = 1.0
    return heads, filters


@pytest.mark.parametrize("kind", ["bert", "distilbert", "mpnet"])
def test_tuning_lowers_each_layers_reconstruction_error(kind):
    model = tiny_model(kind)
    adapter = get_adapter(model)
    heads, filters = _half_masks(adapter)
    _, tuned_filters, report = tune.tune_masks(model, adapter, _batches(), heads, filters, "cpu", damp=1.0,
                                               progress=False)
    for layer in report:
        for branch in ("attention", "ffn"):
            assert layer[branch]["error_after"] <= layer[branch]["error_before"] * (1 + 1e-9)
    assert report[-1]["ffn"]["error_after"] < 0.99 * report[-1]["ffn"]["error_before"]
    for m, t in zip(filters, tuned_filters):
        assert torch.equal(t == 0, m == 0)  # tuning never revives a pruned unit


@pytest.mark.parametrize("tuner,layer", [("tune_masks", 0), ("tune_weights", 1)])
def test_reported_error_after_tuning_matches_a_direct_measurement(tuner, layer):
    """The reported error after tuning equals ||S - T||^2 of the tuned model against an untouched teacher."""
    teacher, model = tiny_model("bert"), tiny_model("bert")
    adapter = get_adapter(model)
    batches = _batches()
    heads, filters, report = getattr(tune, tuner)(model, adapter, batches, *_half_masks(adapter), "cpu",
                                                  progress=False)
    targets = tune._teacher_targets(teacher, get_adapter(teacher), batches, layer, "cpu")
    stats = tune._student_stats(model, adapter, batches, layer, "ffn", heads, filters, targets, "cpu")
    assert stats["err"] == pytest.approx(report[layer]["ffn"]["error_after"], rel=1e-3)


def test_zero_damping_is_plain_least_squares():
    """With damp=0 and full masks on a model, the solution is the all-ones mask (the dense model fits exactly)."""
    model = tiny_model("bert")
    adapter = get_adapter(model)
    heads, filters = adapter.ones_masks()
    tuned_heads, tuned_filters, report = tune.tune_masks(model, adapter, _batches(), heads, filters, "cpu",
                                                         damp=0.0, progress=False)
    for m in tuned_heads + tuned_filters:
        torch.testing.assert_close(m, torch.ones_like(m), rtol=0, atol=1e-3)


@pytest.mark.parametrize("kind", ["bert", "mpnet"])
def test_tuning_sees_through_the_fast_path(kind, monkeypatch):
    """Tuning hooks the LayerNorms and projections the GPU fast path fuses away; with the fast path
    installed (and forced on for CPU) a fused module that is hooked runs unfused, so tuning gives the
    same masks as on the plain model."""
    from compress.arch import fast_path

    monkeypatch.setattr(fast_path, "FAST_DEVICES", ("cuda", "cpu"))
    results = []
    for install in (False, True):
        model = tiny_model(kind).eval()
        adapter = get_adapter(model)
        if install:
            adapter.install_fast_path()
        heads, filters = _half_masks(adapter)
        with torch.no_grad():
            results.append(tune.tune_masks(model, adapter, _batches(), heads, filters, "cpu", progress=False))
    for plain, fast in zip(results[0][:2], results[1][:2]):
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(plain, fast))


def _masked_outputs(model, adapter, heads, filters, batches):
    with torch.no_grad(), adapter.masks(heads, filters):
        return [model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches]


@pytest.mark.parametrize("kind", KINDS)
def test_weight_tuning_beats_mask_tuning_and_keeps_the_masks(kind):
    """Refitting the output projections lowers every branch's error at least as far as the masks do (the
    mask scales are one point of its search space), leaves the masks binary, and touches no pruned column."""
    batches = _batches()
    masked_model = tiny_model(kind)
    masked_adapter = get_adapter(masked_model)
    by_mask = tune.tune_masks(masked_model, masked_adapter, batches, *_half_masks(masked_adapter), "cpu", damp=0.0,
                              progress=False)[2]
    model = tiny_model(kind)
    adapter = get_adapter(model)
    heads, filters = _half_masks(adapter)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out_heads, out_filters, report = tune.tune_weights(model, adapter, batches, heads, filters, "cpu", damp=0.0,
                                                       progress=False)
    assert all(torch.equal(a, b) for a, b in zip(heads + filters, out_heads + out_filters))
    # only layer 0 sees the same input under both tunings; later layers' inputs differ
    assert report[0]["ffn"]["error_after"] < 0.5 * by_mask[0]["ffn"]["error_after"]
    for layer in report:
        for branch in ("attention", "ffn"):
            assert layer[branch]["error_after"] <= layer[branch]["error_before"] * (1 + 1e-9)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    parts = adapter.layer_parts(1)  # layer 0 keeps every head (_half_masks), so its attention has nothing to fix
    o_name = next(n for n, p in model.named_parameters() if p is parts.o.weight)
    ffn_name = next(n for n, p in model.named_parameters() if p is parts.ffn_out.weight)
    assert o_name in changed and ffn_name in changed
    assert all(n.endswith(("weight", "bias")) for n in changed)
    pruned = (filters[1] == 0).nonzero().flatten()
    torch.testing.assert_close(parts.ffn_out.weight[:, pruned], before[ffn_name][:, pruned], rtol=0, atol=0)


def test_weight_tuning_with_full_masks_and_no_damping_leaves_the_model():
    """All units kept, no damping: the dense weights already fit exactly, so the outputs do not move."""
    model = tiny_model("bert")
    adapter = get_adapter(model)
    heads, filters = adapter.ones_masks()
    batches = _batches()
    reference = _masked_outputs(model, adapter, heads, filters, batches)
    tune.tune_weights(model, adapter, batches, heads, filters, "cpu", damp=0.0, progress=False)
    for ref, out in zip(reference, _masked_outputs(model, adapter, heads, filters, batches)):
        torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_weight_tuned_model_slims_to_the_masked_function(kind):
    """After weight tuning, slimming (a layer left with no head keeps only its tuned bias) computes what the
    masked model with the tuned weights computes."""
    from compress.pruning import slim

    model = tiny_model(kind)
    adapter = get_adapter(model)
    heads, filters = _half_masks(adapter)
    heads[1] = torch.zeros_like(heads[1])
    batches = _batches()
    tune.tune_weights(model, adapter, batches, heads, filters, "cpu", progress=False)
    reference = _masked_outputs(model, adapter, heads, filters, batches)
    with torch.no_grad():
        slim.slim_model(adapter, heads, filters, filter_multiple=8)
    assert adapter.num_heads()[1] == 0
    for ref, out in zip(reference, _masked_outputs(model, adapter, None, None, batches)):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tuner", ["tune_masks", "tune_weights"])
def test_layerwise_tuning_equals_the_reference_path(kind, tuner):
    """One layer at a time on cached hidden states (the default) gives the masks, weights and errors of
    the reference path that re-runs the model from the embedding for every layer and branch."""
    results = []
    for layerwise in (False, True):
        model = tiny_model(kind)
        adapter = get_adapter(model)
        heads, filters = _half_masks(adapter)
        out = getattr(tune, tuner)(model, adapter, _batches_padded(), heads, filters, "cpu", progress=False,
                                   layerwise=layerwise)
        results.append((out, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (ref, ref_params), (new, new_params) = results
    for a, b in zip(ref[0] + ref[1], new[0] + new[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for name, p in ref_params.items():
        torch.testing.assert_close(new_params[name], p, rtol=1e-4, atol=1e-5)
    for r, n in zip(ref[2], new[2]):
        for branch in ("attention", "ffn"):
            assert n[branch]["error_after"] == pytest.approx(r[branch]["error_after"], rel=1e-3, abs=1e-6)


def _batches_padded():
    """Two batches with padding at different places, so that only the valid tokens may count."""
    out = []
    for s, lengths in ((0, (12, 7, 3)), (1, (9, 12, 5))):
        batch = dict(tiny_inputs(3, 12, seed=s), labels=torch.zeros(3, dtype=torch.long))
        batch["attention_mask"] = (torch.arange(12)[None] < torch.tensor(lengths)[:, None]).long()
        out.append(batch)
    return out
