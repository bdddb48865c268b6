"""The mask search meets its budget and is exact for the FLOPs cost model (checked by brute force)."""

import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from compress.pruning import cost, search  # noqa: E402
from compress.arch import get_adapter  # noqa: E402
from _tiny import tiny_model  # noqa: E402


def _brute_force(head_scores, filter_scores, head_cost, filter_cost, budget):
    items = [(float(s), head_cost[l]) for l, hs in enumerate(head_scores) for s in hs]
    items += [(float(s), filter_cost[l]) for l, fs in enumerate(filter_scores) for s in fs]
    best = 0.0
    for keep in itertools.product((0, 1), repeat=len(items)):
        c = sum(k * i[1] for k, i in zip(keep, items))
        if c <= budget + 1e-9:
            best = max(best, sum(k * i[0] for k, i in zip(keep, items)))
    return best


def _kept_value(masks, scores):
    return sum(float((m * s).sum()) for m, s in zip(masks, scores))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("head_cost,filter_cost", [([5.0, 5.0], [2.0, 2.0]), ([7.0, 4.0], [3.0, 2.0])])
def test_flops_search_is_exact_on_tiny_cases(seed, head_cost, filter_cost):
    g = torch.Generator().manual_seed(seed)
    heads = [torch.rand(2, generator=g), torch.rand(2, generator=g)]
    filters = [torch.rand(3, generator=g), torch.rand(3, generator=g)]
    full = 2 * sum(head_cost) + 3 * sum(filter_cost)
    for ratio in (0.2, 0.45, 0.7, 1.0):
        hm, fm = search.search_flops(heads, filters, head_cost, filter_cost, ratio * full)
        used = sum(float(m.sum()) * c for m, c in zip(hm, head_cost)) + sum(
            float(m.sum()) * c for m, c in zip(fm, filter_cost))
        assert used <= ratio * full + 1e-9
        got = _kept_value(hm, heads) + _kept_value(fm, filters)
        assert got == pytest.approx(_brute_force(heads, filters, head_cost, filter_cost, ratio * full), abs=1e-5)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75])
def test_flops_search_meets_budget_on_a_model(ratio):
    adapter = get_adapter(tiny_model("bert"))
    model = cost.flops_model(adapter, seq_len=37.5)
    g = torch.Generator().manual_seed(1)
    heads = [torch.rand(h, generator=g) for h in adapter.num_heads()]
    filters = [torch.rand(f, generator=g) for f in adapter.num_filters()]
    full = model.flops_counts(adapter.num_heads(), adapter.num_filters())
    hm, fm = search.search_flops(heads, filters, model.head_cost, model.filter_cost, ratio * full)
    kept = model.flops(hm, fm)
    assert kept <= ratio * full * (1 + 1e-9)
    unkept = [c for m, c in zip(hm, model.head_cost) if (m == 0).any()]
    unkept += [c for m, c in zip(fm, model.filter_cost) if (m == 0).any()]
    assert all(c > ratio * full - kept for c in unkept)  # scores are positive: nothing that fits is left out


def test_flops_model_matches_a_hand_count():
    adapter = get_adapter(tiny_model("bert"))  # hidden 64, 4 heads of 16, 128 filters
    model = cost.flops_model(adapter, seq_len=10)
    assert model.head_cost[0] == 4 * 2 * 10 * 64 * 16 + 2 * 2 * 10 * 10 * 16
    assert model.filter_cost[0] == 2 * 2 * 10 * 64


def test_latency_search_meets_budget_and_prefers_important_units():
    table = cost.LatencyTable(attention_ms=[0.0, 1.0, 1.5, 2.0, 2.5], ffn_widths=[0, 64, 128], ffn_ms=[0.0, 1.0, 2.0])
    g = torch.Generator().manual_seed(0)
    heads = [torch.rand(4, generator=g) for _ in range(2)]
    filters = [torch.rand(128, generator=g) for _ in range(2)]
    heads[1] *= 100  # layer 1's heads matter most
    budget = 4.0
    hm, fm = search.search_latency(heads, filters, table, budget)
    used = sum(table.layer_ms(int(h.sum()), int(f.sum())) for h, f in zip(hm, fm))
    assert used <= budget + 1e-9
    assert int(hm[1].sum()) == 4


def test_uniform_baseline_meets_budget():
    head_cost, filter_cost = [100.0, 100.0], [3.0, 3.0]
    scores = ([torch.rand(4), torch.rand(4)], [torch.rand(128), torch.rand(128)])
    full = 8 * 100 + 256 * 3
    hm, fm = search.uniform_masks(*scores, head_cost, filter_cost, 0.5 * full)
    used = sum(float(m.sum()) * 100 for m in hm) + sum(float(m.sum()) * 3 for m in fm)
    assert used <= 0.5 * full
    assert [int(m.sum()) for m in hm] == [2, 2]


@pytest.mark.parametrize("seed", range(6))
def test_flops_search_among_alive_units_is_exact_and_never_revives(seed):
    """The iterative search's step: the optimum over the alive units only, whatever the pruned ones score."""
    g = torch.Generator().manual_seed(seed)
    heads = [torch.rand(2, generator=g), torch.rand(2, generator=g)]
    filters = [torch.rand(3, generator=g), torch.rand(3, generator=g)]
    alive = ([torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])], [torch.tensor([0.0, 1.0, 1.0]), torch.ones(3)])
    heads[0][1] = filters[0][0] = 10.0  # the pruned units would win any unconstrained search
    head_cost, filter_cost = [5.0, 5.0], [2.0, 2.0]
    full = 4 * 5.0 + 6 * 2.0
    for ratio in (0.3, 0.5, 0.8, 1.0):
        hm, fm = search.search_flops(heads, filters, head_cost, filter_cost, ratio * full, alive)
        assert all(bool((m <= a).all()) for m, a in zip(hm + fm, alive[0] + alive[1]))
        alive_heads = [s[a != 0] for s, a in zip(heads, alive[0])]
        alive_filters = [s[a != 0] for s, a in zip(filters, alive[1])]
        best = _brute_force(alive_heads, alive_filters, head_cost, filter_cost, ratio * full)
        assert _kept_value(hm, heads) + _kept_value(fm, filters) == pytest.approx(best, abs=1e-5)


def test_flops_search_with_everything_alive_is_the_one_shot_search():
    g = torch.Generator().manual_seed(3)
    heads = [torch.rand(4, generator=g) for _ in range(2)]
    filters = [torch.rand(16, generator=g) for _ in range(2)]
    costs = ([7.0, 7.0], [1.0, 1.0])
    alive = ([torch.ones(4)] * 2, [torch.ones(16)] * 2)
    for budget in (10.0, 25.0, 40.0):
        plain = search.search_flops(heads, filters, *costs, budget)
        masked = search.search_flops(heads, filters, *costs, budget, alive)
        assert all(torch.equal(a, b) for a, b in zip(plain[0] + plain[1], masked[0] + masked[1]))


def test_flops_search_with_nothing_alive_keeps_nothing():
    heads, filters = [torch.rand(2)], [torch.rand(3)]
    hm, fm = search.search_flops(heads, filters, [5.0], [2.0], 100.0, ([torch.zeros(2)], [torch.zeros(3)]))
    assert hm[0].sum() == 0 and fm[0].sum() == 0


def test_flops_schedule_is_linear_and_ends_exactly_at_the_target():
    assert search.flops_schedule(0.6, 1) == [0.6]
    assert search.flops_schedule(0.5, 4) == pytest.approx([0.875, 0.75, 0.625, 0.5])
    assert search.flops_schedule(0.7, 3)[-1] == 0.7  # the target itself, not 1 - (1 - 0.7) * 3 / 3
    steps = search.flops_schedule(0.35, 7)
    assert all(a > b for a, b in zip(steps, steps[1:])) and steps[-1] == 0.35


def _joint_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    heads = [torch.rand(4, generator=g) for _ in range(3)]
    filters = [torch.rand(128, generator=g) for _ in range(3)]
    table = cost.LatencyTable(attention_ms=[0.0, 1.0, 1.2, 2.0, 2.1], ffn_widths=[0, 32, 64, 96, 128],
                              ffn_ms=[0.0, 1.0, 1.0, 2.0, 2.0], exact_widths=True)
    head_cost, filter_cost = [50.0] * 3, [1.0] * 3
    return heads, filters, table, head_cost, filter_cost


def _used(table, hm, fm, head_cost, filter_cost):
    ms = sum(table.layer_ms(int(h.sum()), int(f.sum())) for h, f in zip(hm, fm))
    flops = sum(float(h.sum()) * c for h, c in zip(hm, head_cost)) + sum(float(f.sum()) * c for f, c in zip(fm, filter_cost))
    return ms, flops


def test_exact_width_tables_keep_only_measured_widths():
    heads, filters, table, _, _ = _joint_problem()
    hm, fm = search.search_latency(heads, filters, table, 7.0)
    assert all(int(f.sum()) in table.ffn_widths for f in fm)
    # on a step-shaped table the search keeps the widest width of each step: 64 costs what 32 does
    assert all(int(f.sum()) in (0, 64, 128) for f in fm)


@pytest.mark.parametrize("seed", range(4))
def test_latency_and_flops_budgets_hold_together(seed):
    heads, filters, table, head_cost, filter_cost = _joint_problem(seed)
    full = 12 * 50.0 + 384 * 1.0
    for ms_budget, flops_frac in [(7.0, 0.5), (9.0, 0.4), (12.0, 0.6), (5.0, 0.9)]:
        hm, fm = search.search_latency(heads, filters, table, ms_budget,
                                       flops=(head_cost, filter_cost, flops_frac * full))
        ms, flops = _used(table, hm, fm, head_cost, filter_cost)
        assert ms <= ms_budget + 1e-9 and flops <= flops_frac * full + 1e-9
        value = sum(float((h * s).sum()) for h, s in zip(hm, heads)) + sum(float((f * s).sum()) for f, s in zip(fm, filters))
        # against every combination of options (0..4 heads x 5 widths per layer): within the relaxation's gap
        best = _best_option_combination(heads, filters, table, head_cost, filter_cost, ms_budget, flops_frac * full)
        assert 0.98 * best <= value <= best * (1 + 1e-6)


def _best_option_combination(heads, filters, table, head_cost, filter_cost, ms_budget, flops_budget):
    import numpy as np

    def prefix(s):
        return np.concatenate([[0.0], np.cumsum(np.sort(s.double().numpy())[::-1])])

    layers = []
    for h, f, hc, fc in zip(heads, filters, head_cost, filter_cost):
        ph, pf = prefix(h), prefix(f)
        layers.append([(table.layer_ms(nh, w), nh * hc + w * fc, ph[nh] + pf[w])
                       for nh in range(len(h) + 1) for w in table.ffn_widths])
    best = -1.0
    for combo in itertools.product(*layers):
        if sum(c[0] for c in combo) <= ms_budget + 1e-9 and sum(c[1] for c in combo) <= flops_budget + 1e-9:
            best = max(best, sum(c[2] for c in combo))
    return best


def test_a_slack_flops_budget_changes_nothing():
    heads, filters, table, head_cost, filter_cost = _joint_problem()
    alone = search.search_latency(heads, filters, table, 7.0)
    both = search.search_latency(heads, filters, table, 7.0, flops=(head_cost, filter_cost, 1e9))
    assert all(torch.equal(a, b) for a, b in zip(alone[0] + alone[1], both[0] + both[1]))


def test_latency_table_round_trips_and_rejects_malformed(tmp_path):
    from compress.pruning import latency
    from compress.errors import UserError

    table = cost.LatencyTable([0.0, 1.0], [0, 8, 16], [0.0, 0.5, 0.5], overhead_ms=2.0, exact_widths=True,
                              meta={"batch": 32})
    path = latency.save_table(table, tmp_path / "t.json")
    assert latency.load_table(path) == table
    assert table.model_ms([1, 0], [16, 8]) == pytest.approx(2.0 + 1.0 + 0.5 + 0.5)
    for text in ["{", '{"attention_ms": [0.0]}', '{"attention_ms": [0, 1], "ffn_widths": [8, 0], "ffn_ms": [0, 1]}']:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(UserError, match="not one `compress latency-table` writes"):
            latency.load_table(tmp_path / "bad.json")
    with pytest.raises(UserError, match="not found"):
        latency.load_table(tmp_path / "missing.json")


def test_latency_search_never_revives_a_pruned_unit():
    heads, filters, table, head_cost, filter_cost = _joint_problem(1)
    alive = ([torch.tensor([1.0, 0, 1, 0])] * 3, [torch.cat([torch.ones(64), torch.zeros(64)])] * 3)
    for ms_budget in (3.0, 7.0, 100.0):
        hm, fm = search.search_latency(heads, filters, table, ms_budget, alive=alive,
                                       flops=(head_cost, filter_cost, 0.9 * (12 * 50.0 + 384)))
        for m, a in zip(hm + fm, alive[0] + alive[1]):
            assert not bool((m * (1 - a)).any())
        assert sum(table.layer_ms(int(h.sum()), int(f.sum())) for h, f in zip(hm, fm)) <= ms_budget + 1e-9
    # with room for everything alive, everything alive is kept
    assert [int(h.sum()) for h in hm] == [2, 2, 2] and [int(f.sum()) for f in fm] == [64, 64, 64]


def test_latency_search_takes_a_negative_table_entry_as_free():
    """A table read off noisy timings may hold a slightly negative difference; the knapsack must not break."""
    table = cost.LatencyTable(attention_ms=[0.0, -0.01, 1.0], ffn_widths=[0, 8, 16], ffn_ms=[0.0, -0.02, 1.0],
                              exact_widths=True)
    hm, fm = search.search_latency([torch.tensor([1.0, 2.0])], [torch.rand(16)], table, 0.5)
    assert int(hm[0].sum()) == 1 and int(fm[0].sum()) == 8


def test_latency_search_can_be_told_to_keep_a_head_in_the_last_layer():
    heads, filters, table, _, _ = _joint_problem(2)
    heads[-1] = heads[-1] * 1e-3  # the last layer's heads look worthless to the Fisher
    free = search.search_latency(heads, filters, table, 4.0)
    assert int(free[0][-1].sum()) == 0
    kept = search.search_latency(heads, filters, table, 4.0, min_last_heads=1)
    assert int(kept[0][-1].sum()) >= 1
    assert sum(table.layer_ms(int(h.sum()), int(f.sum())) for h, f in zip(*kept)) <= 4.0 + 1e-9
    alive = ([torch.ones(4)] * 2 + [torch.zeros(4)], [torch.ones(128)] * 3)  # nothing left to keep: no error
    assert int(search.search_latency(heads, filters, table, 4.0, alive=alive, min_last_heads=1)[0][-1].sum()) == 0
