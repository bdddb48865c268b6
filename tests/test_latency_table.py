"""The measured latency table (compress.pruning.latency, `compress latency-table`) and pruning under a latency
budget with it, alone or together with a FLOPs budget; tiny random models on CPU, nothing downloaded."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from compress.pruning import latency  # noqa: E402
from compress.arch import get_adapter  # noqa: E402
from compress.cli import main  # noqa: E402
from compress.pruning.cost import LatencyTable  # noqa: E402
from _tiny import finetuned_tiny_sst2, tiny_config  # noqa: E402


@pytest.mark.parametrize("kind", ["bert", "mpnet"])
def test_table_covers_every_head_count_and_the_width_grid(kind):
    table = latency.measure_table(tiny_config(kind), batch=2, seq=8, device="cpu", widths=[32, 64], trials=1,
                                  progress=False)
    assert len(table.attention_ms) == 4 + 1 and table.attention_ms[0] == 0.0
    assert table.ffn_widths == [0, 32, 64, 128] and table.ffn_ms[0] == 0.0
    assert table.overhead_ms > 0 and not table.exact_widths  # cpu: interpolated
    m = table.meta
    assert (m["hidden"], m["heads"], m["filters"], m["layers"], m["batch"], m["seq"]) == (64, 4, 128, 2, 2, 8)
    # the identity the table is built on: the dense time is its prediction plus the interaction term
    assert table.model_ms([4, 4], [128, 128]) + m["interaction_ms"] == pytest.approx(m["dense_ms"])


def test_width_grid_is_fine_on_gpu_and_coarse_on_cpu():
    gpu = latency.width_grid(3072, "cuda")
    assert gpu[:8] == [0, 8, 16, 24, 32, 48, 64, 96] and 2048 in gpu and gpu[-1] == 3072
    assert all(b - a <= 64 for a, b in zip(gpu, gpu[1:]))
    assert latency.width_grid(3072, "cpu") == [384 * k for k in range(9)]


def test_check_table_refuses_another_architecture():
    from compress.errors import UserError
    from _tiny import tiny_model

    table = latency.measure_table(tiny_config("bert"), batch=1, seq=4, device="cpu", widths=[64], trials=1,
                                  progress=False)
    latency.check_table(table, get_adapter(tiny_model("bert")))
    table.meta["hidden"] = 768
    with pytest.raises(UserError, match="measured for a model with"):
        latency.check_table(table, get_adapter(tiny_model("bert")))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("lat")
    data, ft = finetuned_tiny_sst2(root, max_steps=10)
    measured = root / "measured.json"
    assert main(["latency-table", "--model", str(ft), "-o", str(measured), "--device", "cpu", "--batch-size", "4",
                 "--seq-len", "16", "--trials", "2"]) == 0
    # the pruning tests budget with a noise-free table of the same model (CPU timings of a tiny model are noise)
    table = latency.load_table(measured)
    table.attention_ms, table.ffn_widths, table.ffn_ms = [0.0, 0.1, 0.2, 0.3, 0.4], [0, 64, 128], [0.0, 0.3, 0.6]
    table.overhead_ms, table.exact_widths = 0.5, False
    table.meta["dense_ms"] = table.model_ms([4, 4], [128, 128])
    return root, data, ft, latency.save_table(table, root / "table.json")


def test_latency_table_command_writes_a_loadable_table(work, capsys):
    root, data, ft, table = work
    loaded = latency.load_table(root / "measured.json")
    assert loaded.meta["batch"] == 4 and loaded.meta["seq"] == 16 and len(loaded.attention_ms) == 5
    assert main(["latency-table", "--model", str(ft), "-o", str(root / "measured.json"), "--device", "cpu"]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("budget", [["--speedup", "1.3"], ["--speedup", "1.3", "--flops", "0.5"],
                                    ["--speedup", "1.3", "--flops", "0.5", "--search-steps", "2"]])
def test_prune_under_a_speedup_with_a_table(work, tmp_path, capsys, budget):
    root, data, ft, table = work
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(ft), "--task", "sst2", "--data-dir", str(data), "-o", str(out),
                 "--num-samples", "32", "--latency-table", str(table), *budget]) == 0
    summary = capsys.readouterr().out
    assert "predicted by the table" in summary
    record = json.loads((out / "prune.json").read_text())
    lat = record["latency"]
    assert lat["budget_ms"] == pytest.approx(lat["dense_ms"] / 1.3)
    assert lat["predicted_ms"] <= lat["budget_ms"] + 1e-9
    kept = latency.load_table(table).model_ms(record["num_attention_heads_per_layer"],
                                              [f - z for f, z in zip(record["intermediate_size_per_layer"],
                                                                     record["zero_filters_per_layer"])])
    assert kept <= lat["budget_ms"] + 1e-9
    if "--flops" in budget:
        assert record["flops_ratio"] <= 0.5 + 1e-9
        assert record["constraint"] == {"flops": 0.5, "speedup": 1.3}
    if "--search-steps" in budget:  # the latency budget steps down from the dense time with the FLOPs
        assert [s["flops"] for s in record["steps"]] == pytest.approx([0.75, 0.5])
        assert lat["step_budgets_ms"] == pytest.approx([(lat["dense_ms"] + lat["budget_ms"]) / 2, lat["budget_ms"]])
        first, last = record["steps"]
        assert all(b <= a for a, b in zip(first["heads"] + first["filters"], last["heads"] + last["filters"]))


def _bad(argv, tmp_path, capsys, message):
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("extra,message", [
    (["--latency-table", "{tmp}/none.json", "--speedup", "1.5"], "not found"),
    (["--latency-table", "{table}", "--flops", "0.5"], "--latency-table needs a latency budget"),
    (["--latency-ms", "3", "--speedup", "1.5"], "not both"),
    (["--speedup", "0"], "--speedup must be positive"),
    (["--latency-table", "{table}", "--speedup", "1000"], "below the unprunable part"),
    (["--latency-table", "{table}", "--speedup", "4.5"], "--no-keep-last-head lifts that"),
    (["--latency-table", "{table}", "--speedup", "1.5", "--method", "random", "--flops", "0.5"],
     "needs --flops and no latency budget"),
    (["--latency-table", "{table}", "--speedup", "1.5", "--search-steps", "2", "--method", "random"],
     "--search-steps 2 needs --method fisher"),
])
def test_bad_latency_inputs_exit_2_with_one_line(work, tmp_path, capsys, extra, message):
    root, data, ft, table = work
    argv = ["prune", "--model", str(ft), "--task", "sst2", "--data-dir", str(data), "-o", str(tmp_path / "out"),
            "--num-samples", "16"] + [a.format(tmp=tmp_path, table=table) for a in extra]
    _bad(argv, tmp_path, capsys, message)


def test_a_table_of_another_model_is_refused(work, tmp_path, capsys):
    root, data, ft, table = work
    other = json.loads(table.read_text())
    other["meta"]["filters"] = 3072
    (tmp_path / "other.json").write_text(json.dumps(other))
    _bad(["prune", "--model", str(ft), "--task", "sst2", "--data-dir", str(data), "-o", str(tmp_path / "out"),
          "--num-samples", "16", "--latency-table", str(tmp_path / "other.json"), "--speedup", "1.2"],
         tmp_path, capsys, "measured for a model with")


@pytest.mark.gpu
def test_gpu_table_predicts_a_mixed_shape():
    """The table is built from uniform models; a model whose layers differ must still be predicted."""
    config = tiny_config("bert")
    config.update(dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=4,
                       max_position_embeddings=512))
    table = latency.measure_table(config, batch=32, seq=128, device="cuda", progress=False)
    assert table.exact_widths
    heads, filters = [12, 7, 2, 0], [3072, 1536, 320, 64]
    measured = latency.time_model(latency.slimmed_copy(latency.dense_model(config), heads, filters, 1), "cuda",
                                  [32], 128)["b32"]["ms"]
    assert measured == pytest.approx(table.model_ms(heads, filters), rel=0.1)


def test_latency_search_report_joins_metrics_and_timings(tmp_path):
    from evals import latency_search_report as report

    run = "/w/mpnet-base-rte"
    state = {f"{run}/dense:eval": {"accuracy": 66.0, "num_examples": 277},
             f"{run}/fisher-speedup1.6-0.5:prune": {"flops_ratio": 0.49, "heads": [1], "filters": [8],
                                                    "latency": {"predicted_ms": 1.1, "budget_ms": 1.13, "dense_ms": 1.8}},
             f"{run}/fisher-speedup1.6-0.5:eval": {"accuracy": 65.0, "num_examples": 277},
             f"{run}/fisher-0.5:prune": {"flops_ratio": 0.5, "heads": [2], "filters": [16]}}  # never evaluated
    timings = {"command": "python evals/encoder_latency.py", "dense": {"mpnet-base": {"cuda:b32": 1.8, "cuda:b1": 0.5}},
               "entries": [{"task": "rte", "method": "fisher-speedup1.6", "flops": 0.5,
                            "ms": {"cuda:b32": 1.125}, "speedup": {"cuda:b32": 1.6, "cuda:b1": 1.2}}]}
    (tmp_path / "s.json").write_text(json.dumps(state))
    (tmp_path / "l.json").write_text(json.dumps(timings))
    table = latency.save_table(LatencyTable([0.0, 0.4], [0, 8, 16], [0.0, 0.2, 0.3], overhead_ms=0.5,
                                            meta={"dense_ms": 1.76}), tmp_path / "t.json")
    assert report.main(["--table", str(table), "--round", "r", str(tmp_path / "s.json"), str(tmp_path / "l.json"),
                        "--out", str(tmp_path / "o")]) == 0
    md = (tmp_path / "o.md").read_text()
    assert "| rte | fisher-speedup1.6 | 0.490 | 66.0 | 65.0 | -1.0 | 1.100 (1.60x) | 1.125 | 1.60x | 1.20x |" in md
    assert "| rte | fisher |" not in md
    assert "1 pruned shapes: measured minus predicted +2.3% to +2.3%" in md
    assert report.main(["--table", str(table), "--round", "r", str(tmp_path / "s.json"), "-", "--out", str(tmp_path / "p")]) == 0
    assert "| 1.100 (1.60x) | - | - | - |" in (tmp_path / "p.md").read_text()


def test_latency_table_plot_writes_a_png(tmp_path):
    from evals import latency_table_plot

    table = LatencyTable([0.0, 0.4, 0.5], [0, 8, 16], [0.0, 0.2, 0.3], overhead_ms=0.5,
                         meta={"model_type": "bert", "layers": 2, "heads": 2, "filters": 16, "device": "x"})
    path = latency.save_table(table, tmp_path / "t.json")
    assert latency_table_plot.main([str(path), "--out", str(tmp_path / "t.png")]) == 0
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert latency_table_plot.main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "u.png")]) == 2


def test_prune_measures_its_own_table_without_one(work, tmp_path):
    """A generous budget: a tiny model's CPU timings are noise, so only the plumbing is checked here."""
    root, data, ft, _ = work
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(ft), "--task", "sst2", "--data-dir", str(data), "-o", str(out),
                 "--num-samples", "16", "--flops", "0.6", "--latency-ms", "1000", "--latency-batch-size", "2"]) == 0
    lat = json.loads((out / "prune.json").read_text())["latency"]
    assert lat["table"] == "measured" and lat["latency_table"]["meta"]["batch"] == 2
    assert not lat["latency_table"]["exact_widths"]  # cpu: 9 widths, interpolated
    assert lat["predicted_ms"] <= lat["budget_ms"] + 1e-9
