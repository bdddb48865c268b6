"""`--method fisher-group` / `fisher-width` (compress.pruning.group_fisher) on the tiny Gemmas of
test_gemma_prune: each option's cost (a head mask, an MLP width) is the Fisher of the exact change it makes to
the branch's normalised output (checked against autograd through an injected perturbation), the head options
are every GQA-shaped mask, and the pipeline meets the budget with them."""

from __future__ import annotations

import math

import pytest
import torch

from compress.arch.gemma import GemmaAdapter
from compress.pruning import gqa
from compress.pruning.group_fisher import group_fisher_scores
from test_gemma_prune import _ids, _model


@pytest.fixture(params=["gemma2", "gemma3"])
def kind(request):
    return request.param


def test_feasible_masks_are_every_gqa_shape():
    masks = gqa.feasible_masks(4, 2, 64)
    assert len(masks) == 1 + (4 + 4) + (2 + 1)  # empty; one head in one or both groups; both heads of one or both
    assert len({tuple(m.tolist()) for m in masks}) == len(masks)
    for m in masks:
        kept = m.view(2, 2).sum(1)
        assert len(set(kept[kept > 0].tolist())) <= 1
    assert gqa.feasible_masks(16, 2, 64) is None and len(gqa.feasible_masks(4, 4, 64)) == 16


def _brute_force_z(model, adapter, ids, layer, mask, branch="attention"):
    """Per window: d(mean NLL)/d eps when the post-norm output of `layer`'s branch moves by eps * (masked - dense)."""
    parts = adapter.layer_parts(layer)
    norm = parts.attn_norm if branch == "attention" else parts.ffn_norm
    seen = {}
    handle = norm.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out.detach()))
    with torch.no_grad():
        model(input_ids=ids)
        dense = seen["out"]
        masks = list(adapter.ones_masks())
        masks[branch != "attention"][layer] = mask
        with adapter.masks(*masks):
            model(input_ids=ids)
        delta = seen["out"] - dense
    handle.remove()
    eps = torch.zeros(len(ids), 1, 1, requires_grad=True)
    handle = norm.register_forward_hook(lambda m, a, out: out + eps * delta)
    logits = model(input_ids=ids).logits[:, :-1]
    handle.remove()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    nll.view(len(ids), -1).mean(1).sum().backward()
    return eps.grad.flatten()


def test_option_costs_are_the_fisher_of_the_exact_change(kind):
    model = _model(kind)
    adapter, ids = GemmaAdapter(model), _ids(4, 16)
    batches = [{"input_ids": ids[:2]}, {"input_ids": ids[2:]}]
    *_, options, filter_options, _ = group_fisher_scores(model, adapter, batches, "cpu", [2, 2], progress=False,
                                                         mlp_levels=4)
    assert [len(o) for o in options] == [len(gqa.feasible_masks(4, 2, 64))] * 2
    for layer in (0, 1):
        for heads, kv, value, mask in options[layer][::3]:
            z = _brute_force_z(model, adapter, ids, layer, mask)
            assert -value == pytest.approx(float(z.pow(2).mean()), rel=1e-3, abs=1e-9)
            assert heads == int(mask.sum()) and kv == int(mask.view(2, 2).any(1).sum())
    full = [o for o in options[0] if o[0] == 4]
    assert len(full) == 1 and math.isclose(full[0][2], 0.0, abs_tol=1e-12)
    for layer in (0, 1):
        assert [n for n, _, _ in filter_options[layer]] == [0, 12, 24, 36, 48]
        for n, value, mask in filter_options[layer][:-1]:
            z = _brute_force_z(model, adapter, ids, layer, mask, "mlp")
            assert int(mask.sum()) == n and -value == pytest.approx(float(z.pow(2).mean()), rel=1e-3, abs=1e-9)


@pytest.mark.parametrize("method", ["fisher-group", "fisher-width"])
def test_group_methods_prune_within_budget(tmp_path, method):
    from compress.pruning.config import PruneConfig
    from compress.pruning.pipeline import Pipeline
    from test_gemma_prune import WORDS, _tokenizer

    model, tok = _model("gemma2"), _tokenizer()
    model.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    (tmp_path / "c.txt").write_text(" ".join(WORDS * 20))
    for flops in (0.7, 0.4):
        config = PruneConfig(model=str(tmp_path / "dense"), output="-", flops=flops, method=method,
                             num_samples=4, seq_len=16, context_len=32, calib=str(tmp_path / "c.txt"), device="cpu")
        pipe = Pipeline(config, progress=False)
        pipe.prune()
        record = pipe.record
        assert record["flops_after"] <= flops * record["flops_before"] * (1 + 1e-9)
        heads, kv = record["num_attention_heads_per_layer"], record["num_key_value_heads_per_layer"]
        assert all(h == k == 0 or h % k == 0 for h, k in zip(heads, kv))
