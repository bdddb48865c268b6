"""Masks as the currency between stages: all-ones masks are the identity, the Fisher is per example,
rearrangement never raises its objective."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from compress.pruning import fisher, rearrange  # noqa: E402
from compress.arch import get_adapter  # noqa: E402
from _tiny import KINDS, tiny_inputs, tiny_model  # noqa: E402


@pytest.mark.parametrize("kind", KINDS)
def test_all_ones_masks_leave_outputs_unchanged(kind):
    model = tiny_model(kind)
    adapter = get_adapter(model)
    x = tiny_inputs()
    with torch.no_grad():
        ref = model(**x).logits
        with adapter.masks(*adapter.ones_masks()):
            out = model(**x).logits
        with adapter.masks(*adapter.ones_masks()):
            pass
        after = model(**x).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(after, ref, rtol=0, atol=0)  # hooks are removed on exit


@pytest.mark.parametrize("kind", ["bert", "mpnet"])
def test_zero_head_mask_changes_outputs(kind):
    model = tiny_model(kind)
    adapter = get_adapter(model)
    heads, filters = adapter.ones_masks()
    heads[0][1] = 0.0
    x = tiny_inputs()
    with torch.no_grad():
        ref = model(**x).logits
        with adapter.masks(heads, filters):
            out = model(**x).logits
    assert (out - ref).abs().max() > 1e-4


def test_per_example_mask_gradients_match_single_example_gradients():
    model = tiny_model("bert")
    adapter = get_adapter(model)
    x = tiny_inputs(batch=3)
    labels = torch.tensor([0, 1, 1])
    batch = dict(x, labels=labels)
    head_grads, filter_grads = fisher.mask_gradients(model, adapter, [batch], "cpu", progress=False)
    assert head_grads[0].shape == (3, 4) and filter_grads[1].shape == (3, 128)
    one = {k: v[2:3] for k, v in batch.items()}
    single_heads, single_filters = fisher.mask_gradients(model, adapter, [one], "cpu", progress=False)
    torch.testing.assert_close(head_grads[1][2], single_heads[1][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(filter_grads[0][2], single_filters[0][0], rtol=1e-4, atol=1e-6)
    assert float(head_grads[0].abs().sum()) > 0


def _one_example_grads(model, adapter, x, loss_of_logits):
    """Head and filter mask gradients of one example, by a plain backward through the masks."""
    hm = [torch.ones(1, h, requires_grad=True) for h in adapter.num_heads()]
    fm = [torch.ones(1, f, requires_grad=True) for f in adapter.num_filters()]
    with adapter.masks(hm, fm):
        loss = loss_of_logits(model(**x).logits)
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, hm + fm)])


def test_model_fisher_of_a_classifier_is_the_expectation_over_its_own_predictions():
    model = tiny_model("bert", num_labels=3)
    adapter = get_adapter(model)
    x = {k: v[1:2] for k, v in tiny_inputs(batch=3).items()}
    rows = fisher.mask_gradients(model, adapter, [dict(x, labels=torch.tensor([0]))], "cpu", progress=False,
                                 kind="model")
    g = torch.cat([torch.cat(part, dim=1) for part in rows], dim=1)  # [classes, all masks]
    assert g.shape[0] == 3
    with torch.no_grad():
        p = model(**x).logits.softmax(-1)[0]
    expected = sum(float(p[c]) * torch.outer(gc, gc) for c in range(3)
                   for gc in [_one_example_grads(model, adapter, x, lambda z, c=c: -z.log_softmax(-1)[0, c])])
    torch.testing.assert_close(g.T @ g, expected, rtol=1e-4, atol=1e-8)


def test_model_fisher_of_a_regressor_ignores_the_labels_and_the_empirical_one_does_not():
    model = tiny_model("bert", num_labels=1)
    adapter = get_adapter(model)
    x = tiny_inputs(batch=2)

    def grads(kind, labels):
        heads, filters = fisher.mask_gradients(model, adapter, [dict(x, labels=labels)], "cpu", progress=False,
                                               kind=kind)
        return torch.cat(heads + filters, dim=1)

    a, b = torch.tensor([0.0, 1.0]), torch.tensor([3.0, -2.0])
    torch.testing.assert_close(grads("model", a), grads("model", b))
    assert (grads("empirical", a) - grads("empirical", b)).abs().max() > 1e-4
    out_grad = _one_example_grads(model, adapter, {k: v[:1] for k, v in x.items()}, lambda z: z.sum())
    torch.testing.assert_close(grads("model", a)[0], out_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("seed", range(5))
def test_rearrangement_never_raises_objective_and_keeps_counts(seed):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(40, 24, generator=g) * torch.rand(24, generator=g)
    fisher_block = rearrange.block_fisher(grads)
    mask = torch.zeros(24)
    mask[torch.randperm(24, generator=g)[:10]] = 1.0
    new = rearrange.rearrange_layer(mask, fisher_block)
    assert int(new.sum()) == 10
    assert rearrange.objective(new, fisher_block) <= rearrange.objective(mask, fisher_block) + 1e-12


def test_rearrangement_finds_the_optimum_of_a_diagonal_fisher():
    fisher_block = torch.diag(torch.tensor([5.0, 1.0, 4.0, 0.5, 3.0]))
    mask = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0])  # prunes the two most important units
    new = rearrange.rearrange_layer(mask, fisher_block)
    assert new.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]


def test_mask_gradients_at_given_masks_are_those_of_the_masked_model():
    """With `masks` the gradients are taken at those values (the iterative search's already-pruned model):
    per example they match a plain backward through the masks set there, and differ from all ones."""
    model = tiny_model("bert")
    adapter = get_adapter(model)
    batch = dict(tiny_inputs(batch=3), labels=torch.tensor([0, 1, 1]))
    heads = [torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.ones(4)]  # layer 0 lost two heads
    filters = [torch.ones(128), (torch.arange(128) % 3 != 0).float()]
    head_grads, filter_grads = fisher.mask_gradients(model, adapter, [batch], "cpu", progress=False,
                                                     masks=(heads, filters))
    one = {k: v[1:2] for k, v in batch.items()}
    hm = [m[None].clone().requires_grad_() for m in heads]
    fm = [m[None].clone().requires_grad_() for m in filters]
    with adapter.masks(hm, fm):
        loss = fisher.task_loss(model(**{k: v for k, v in one.items() if k != "labels"}).logits, one["labels"])
    expected = torch.autograd.grad(loss, hm + fm)
    for got, want in zip([g[1] for g in head_grads + filter_grads], expected):
        torch.testing.assert_close(got, want[0], rtol=1e-4, atol=1e-6)
    dense_heads, _ = fisher.mask_gradients(model, adapter, [batch], "cpu", progress=False)
    kept = fisher.fisher_diagonal(head_grads)[0][[0, 3]]  # the surviving heads of layer 0
    assert (kept - fisher.fisher_diagonal(dense_heads)[0][[0, 3]]).abs().max() > 1e-3 * kept.abs().max()


def test_rearrangement_with_alive_masks_leaves_earlier_pruned_units_pruned():
    """A unit outside `alive` (pruned at an earlier step) stays pruned even when its Fisher is the largest,
    and among the alive units the result is the rearrangement of their own Fisher block."""
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(50, 8, generator=g)
    grads[:, 0] *= 30.0  # unrestricted, the rearrangement would revive unit 0 first
    alive = torch.tensor([0.0, 1, 1, 1, 1, 1, 1, 0])
    mask = torch.tensor([0.0, 1, 0, 1, 0, 1, 0, 0])
    free = rearrange.rearrange([mask], [grads])[0]
    assert free[0] == 1.0  # the test's premise
    new = rearrange.rearrange([mask], [grads], [alive])[0]
    assert new[0] == 0 and new[7] == 0 and int(new.sum()) == int(mask.sum())
    sub = alive.nonzero().flatten()
    expected = rearrange.rearrange_layer(mask[sub], rearrange.block_fisher(grads[:, sub]))
    assert torch.equal(new[sub], expected)
