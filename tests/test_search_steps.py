"""Iterative Fisher search (`search_steps`) on a tiny seeded model: one step is the one-shot pipeline,
more steps meet the budget, never revive a pruned unit, and take each Fisher at the previous masks."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from compress.pruning import cost, fisher, pipeline, rearrange, search, tune  # noqa: E402
from compress.arch import get_adapter  # noqa: E402
from compress.pruning.config import PruneConfig  # noqa: E402
from compress.pruning.stages import Calibration  # noqa: E402
from _tiny import tiny_inputs, tiny_model  # noqa: E402


@pytest.fixture
def setup():
    model = tiny_model("bert")
    batches = [dict(tiny_inputs(batch=8, seq=12, seed=s), labels=torch.randint(0, 2, (8,))) for s in range(2)]
    return model, get_adapter(model), Calibration(batches, 11.0, 16, "test")


def _run(setup, flops, steps):
    model, adapter, calib = setup
    config = PruneConfig(model="m", task="sst2", output="o", flops=flops, search_steps=steps, tune_weights=False,
                         family="encoder", device="cpu")
    pipe = pipeline.Pipeline(config, progress=False)
    flops_model = cost.flops_model(adapter, calib.seq_len)
    heads, filters = pipe.masks(model, adapter, calib, flops_model, (adapter.num_heads(), adapter.num_filters()))
    return heads, filters, flops_model, pipe.record


def _spy(monkeypatch, module, name):
    """Wrap `module.name` so that every call's kwargs and result are kept in the returned list."""
    calls, real = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_one_step_is_the_one_shot_pipeline(setup):
    model, adapter, calib = setup
    heads, filters, flops_model, record = _run(setup, 0.5, 1)
    grads = fisher.mask_gradients(model, adapter, calib.batches, "cpu", progress=False)
    full = flops_model.flops_counts(adapter.num_heads(), adapter.num_filters())
    hm, fm = search.search_flops(*map(fisher.fisher_diagonal, grads), flops_model.head_cost,
                                 flops_model.filter_cost, 0.5 * full)
    hm, fm = rearrange.rearrange(hm, grads[0]), rearrange.rearrange(fm, grads[1])
    hm, fm, _ = tune.tune_masks(model, adapter, calib.batches, hm, fm, "cpu", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(heads + filters, hm + fm))
    assert "steps" not in record


@pytest.mark.parametrize("flops,steps", [(0.4, 3), (0.6, 4), (0.25, 2)])
def test_more_steps_meet_the_budget_at_every_step(setup, flops, steps):
    heads, filters, flops_model, record = _run(setup, flops, steps)
    _, adapter, _ = setup
    full = flops_model.flops_counts(adapter.num_heads(), adapter.num_filters())
    assert flops_model.flops(heads, filters) <= flops * full * (1 + 1e-9)
    assert [s["flops"] for s in record["steps"]] == search.flops_schedule(flops, steps)
    for s in record["steps"]:
        assert flops_model.flops_counts(s["heads"], s["filters"]) <= s["flops"] * full * (1 + 1e-9)


def test_a_unit_pruned_at_one_step_stays_pruned(setup, monkeypatch):
    searches = _spy(monkeypatch, search, "search_flops")
    heads, filters, _, _ = _run(setup, 0.3, 4)
    steps = [out[0] + out[1] for _, _, out in searches]
    assert len(steps) == 4
    for before, after in zip(steps, steps[1:]):
        assert all(bool((a <= b).all()) for a, b in zip(after, before))
    final = heads + filters  # after rearrangement and tuning: still inside the last step's alive set
    assert all(bool((f[b == 0] == 0).all()) for f, b in zip(final, steps[-2]))


def test_each_fisher_is_taken_at_the_previous_steps_masks(setup, monkeypatch):
    grads = _spy(monkeypatch, fisher, "mask_gradients")
    searches = _spy(monkeypatch, search, "search_flops")
    _run(setup, 0.4, 2)
    assert grads[0][1]["masks"] is None
    step1 = searches[0][2]
    assert all(torch.equal(a, b) for a, b in zip(grads[1][1]["masks"][0] + grads[1][1]["masks"][1],
                                                 step1[0] + step1[1]))
    first, second = (fisher.fisher_diagonal(g[2][0]) for g in grads)  # head scores of both steps
    alive = [m != 0 for m in step1[0]]
    changed = max(float((b[a] - f[a]).abs().max()) if a.any() else 0.0 for f, b, a in zip(first, second, alive))
    assert changed > 1e-6  # the scores of surviving heads moved once their layer-mates were masked


def test_search_steps_need_the_fisher_method_and_a_budget():
    from compress.errors import UserError

    base = dict(model="m", task="sst2", output="o")
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(UserError, match="--search-steps must be an integer >= 1"):
            PruneConfig(**base, flops=0.5, search_steps=bad).for_family("encoder")
    with pytest.raises(UserError, match="give a constraint"):
        PruneConfig(**base, search_steps=2).for_family("encoder")
    assert PruneConfig(**base, latency_ms=3.0, search_steps=2).for_family("encoder").search_steps == 2
    with pytest.raises(UserError, match="needs --method fisher"):
        PruneConfig(**base, flops=0.5, method="magnitude", search_steps=2).for_family("encoder")
    assert PruneConfig(**base, latency_ms=3.0).for_family("encoder").search_steps == 1



def test_glue_pruning_method_names_map_onto_the_config_and_the_report():
    from evals import glue_pruning, glue_pruning_report as report

    settings = glue_pruning.method_settings
    assert settings("fisher-iter4", None) == {"method": "fisher", "search_steps": 4, "fisher": "empirical"}
    assert settings("fisher-iter4", "model")["fisher"] == "empirical"  # the name says its Fisher
    assert settings("fisher-model-iter2", None) == {"method": "fisher", "search_steps": 2, "fisher": "model"}
    assert settings("fisher-empirical", "model") == {"method": "fisher", "fisher": "empirical"}
    assert settings("fisher", "model") == {"method": "fisher", "fisher": "model"}
    assert settings("magnitude", None) == {"method": "magnitude"}
    assert settings("fisher-weights", None) == {"method": "fisher", "tune_weights": True}
    assert settings("fisher-masks", "model") == {"method": "fisher", "tune_weights": False, "fisher": "model"}
    assert settings("fisher-iter4-weights", None) == {"method": "fisher", "tune_weights": True, "search_steps": 4,
                                                      "fisher": "empirical"}
    assert settings("fisher-speedup1.65", None) == {"method": "fisher", "speedup": 1.65}
    assert settings("fisher-speedup1.7-free-iter4", None) == {"method": "fisher", "speedup": 1.7, "keep_last_head": False,
                                                             "search_steps": 4, "fisher": "empirical"}
    prune = {"seconds": {"fisher": 4.0, "total": 9.0}, "fisher": "empirical", "search_steps": 4}
    rows = [{"model": "mpnet-base", "task": "stsb", "method": m, "flops": 0.6, "metrics": {"pearson": v},
             "dense": {"pearson": 87.4}, "prune": prune, "speedup": {}}
            for m, v in (("fisher-empirical", 77.0), ("fisher-iter4", 80.0))]
    md = report.markdown({"command": "python evals/glue_pruning.py", "devices": {}, "rows": rows, "latency": None})
    assert "| fisher | fisher-empirical | fisher-iter4 | magnitude |" in md and "| 77.0 | 80.0 |" in md
    assert "- mpnet-base stsb FLOPs 0.6 (fisher-iter4): fisher 4.0, total 9.0" in md
