"""evals/encoder_latency.py on CPU: shape-matched slimmed models, the CPU timer, resume, and the report.

Tiny random encoders (2 layers, hidden 64, 4 heads, 128 filters) whose config.json is written into
tmp_path; nothing downloaded. The CUDA-graph path needs a GPU; here we check its precondition: the
forward runs on the meta device, so it holds no data-dependent host branch (a sync breaks capture).
"""

from __future__ import annotations

import json

import pytest
import torch

from compress.arch import get_adapter
from compress.errors import UserError
from evals import encoder_latency as el
from evals import glue_pruning_report as report
from tests._tiny import tiny_config


@pytest.fixture
def tiny_dir(tmp_path):
    def make(kind="bert", name="tinybert"):
        path = tmp_path / name
        tiny_config(kind).save_pretrained(path)
        return path
    return make


@pytest.mark.parametrize("kind", ["bert", "mpnet"])
def test_slimmed_model_has_the_requested_shapes(tiny_dir, kind):
    config, source = el.base_config(str(tiny_dir(kind)))
    dense = el.dense_model(config)
    model = el.slimmed_copy(dense, [3, 0], [0, 57], filter_multiple=1)
    adapter = get_adapter(model)
    assert adapter.num_heads() == [3, 0] and adapter.num_filters() == [0, 57]
    assert get_adapter(el.slimmed_copy(dense, [3, 0], [0, 57])).num_filters() == [0, 64]  # padded by default
    assert adapter.layer_parts(0).q.out_features == 3 * adapter.head_dim()
    assert adapter.layer_parts(1).q is None  # the 0-head layer has no q/k/v at all
    assert model.config.num_attention_heads_per_layer == [3, 0]
    assert get_adapter(dense).num_heads() == [4, 4]  # the dense parent is left whole
    with torch.inference_mode():
        logits = model(input_ids=torch.randint(5, 64, (3, 12))).logits
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()


def test_bad_shapes_are_user_errors(tiny_dir):
    dense = el.dense_model(el.base_config(str(tiny_dir()))[0])
    with pytest.raises(UserError):
        el.slimmed_copy(dense, [1, 1, 1], [4, 4, 4])
    with pytest.raises(UserError):
        el.slimmed_copy(dense, [5, 1], [4, 4])


@pytest.mark.parametrize("kind", ["bert", "mpnet"])
def test_forward_has_no_host_sync(tiny_dir, kind):
    """Runs on meta tensors: no .item()/bool on data, which CUDA-graph capture would reject."""
    dense = el.dense_model(el.base_config(str(tiny_dir(kind)))[0])
    model = el.slimmed_copy(dense, [2, 0], [40, 0]).to("meta")
    with torch.inference_mode():
        logits = model(input_ids=torch.zeros(2, 16, dtype=torch.long, device="meta")).logits
    assert logits.shape == (2, 2)


def test_cpu_timer_returns_positive_medians(tiny_dir):
    model = el.dense_model(el.base_config(str(tiny_dir()))[0])
    t = el.time_cpu(model, batch=2, seq=16, runs=3, warmup=1)
    assert t["n"] == 3 and t["mode"] == "eager"
    assert 0 < t["min"] <= t["ms"] <= t["max"]


def _state(path, variants):
    state = {"/w/tinybert-dense:eval": {"accuracy": 50.0}}
    for task, method, flops, heads, filters in variants:
        state[f"/w/tinybert-{task}/{method}-{flops:g}:prune"] = {"flops_ratio": flops, "heads": heads,
                                                                "filters": filters}
    path.write_text(json.dumps(state))
    return path


def test_read_variants_parses_names_and_filters(tmp_path):
    state = _state(tmp_path / "s.json", [("sst2", "fisher", 0.5, [2, 1], [60, 9]),
                                         ("bbc-news", "random", 0.4, [2, 2], [50, 50])])
    got = el.read_variants(state, models=["tinybert"])
    assert [(v["task"], v["method"], v["flops"]) for v in got] == [("bbc-news", "random", 0.4), ("sst2", "fisher", 0.5)]
    assert el.read_variants(state, models=["tinybert"], methods=["fisher"])[0]["heads"] == [2, 1]
    with pytest.raises(UserError):
        el.read_variants(state, models=["other"])


def test_run_times_each_shape_once_and_resumes(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_dir()  # ./tinybert/config.json: the model name resolves to that directory
    shared = ([2, 2], [50, 50])  # a uniform baseline shape that two tasks share
    variants = [("sst2", "fisher", 0.5, [3, 0], [70, 0]), ("sst2", "random", 0.5, *shared),
                ("rte", "random", 0.5, *shared)]
    state = _state(tmp_path / "state.json", variants)
    calls = []
    timer = el.time_shape
    monkeypatch.setattr(el, "time_shape", lambda m, d, a: calls.append(get_adapter(m).num_heads()) or timer(m, d, a))
    argv = ["--state", str(state), "--devices", "cpu", "--models", "tinybert", "--out", str(tmp_path / "lat"),
            "--seq", "16", "--batches", "4", "1", "--cpu-runs", "2", "--warmup", "1"]
    result = el.run(el.parse_args(argv))
    assert sorted(calls) == sorted([[4, 4], [3, 0], [2, 2]])  # dense + two distinct shapes
    assert len(result["entries"]) == 3
    for e in result["entries"]:
        assert set(e["speedup"]) == {"cpu:b4", "cpu:b1"} and all(s > 0 for s in e["speedup"].values())
    calls.clear()
    el.run(el.parse_args(argv))
    assert calls == []  # everything already in lat.json
    _state(tmp_path / "state.json", variants + [("rte", "fisher", 0.5, [1, 4], [10, 128])])
    result = el.run(el.parse_args(argv))
    assert calls == [[1, 4]] and len(result["entries"]) == 4
    el.write_outputs(result, tmp_path / "lat")
    assert "| tinybert | rte | fisher | 0.5 |" in (tmp_path / "lat.md").read_text()


def test_resume_refuses_timings_from_another_device(tmp_path):
    path = tmp_path / "lat.json"
    path.write_text(json.dumps({"devices": {"cpu": {"name": "other"}}, "timings": {"cpu": {"k": {}}}, "seq": 128}))
    args = el.parse_args(["--devices", "cpu"])
    with pytest.raises(UserError):
        el.load_result(path, {"cpu": {"name": "this"}}, args)


def test_resume_refuses_timings_in_another_dtype(tmp_path):
    path = tmp_path / "lat.json"
    path.write_text(json.dumps({"devices": {"cuda": {"name": "H100", "dtype": "bfloat16"}},
                                "timings": {"cuda": {"k": {}}}, "seq": 128}))
    args = el.parse_args(["--devices", "cuda", "--cuda-dtype", "float32"])
    with pytest.raises(UserError, match="bfloat16"):
        el.load_result(path, el.describe_devices([], args) | {"cuda": {"name": "H100", "dtype": args.cuda_dtype}}, args)
    el.load_result(path, {"cuda": {"name": "H100", "dtype": "bfloat16"}}, el.parse_args(["--devices", "cuda"]))


def test_glue_report_uses_shape_matched_speedups(tmp_path):
    latency = {"command": "python evals/encoder_latency.py", "method": "cuda: bf16, CUDA graph",
               "devices": {"cuda": {"name": "GPU X"}}, "timings": {"cuda": {}},
               "entries": [{"model": "minilm", "task": "rte", "method": "fisher", "flops": 0.5,
                            "speedup": {"cuda:b32": 1.75}}]}
    (tmp_path / "lat.json").write_text(json.dumps(latency))
    row = {"model": "minilm", "task": "rte", "method": "fisher", "flops": 0.5, "metrics": {"accuracy": 60.0},
           "dense": {"accuracy": 61.0}, "prune": None, "speedup": {"cuda:b32": 0.9}}
    result = {"command": "python evals/glue_pruning.py --report-only", "devices": {"cuda": "old"}, "rows": [row]}
    md = report.markdown(report.use_encoder_latency(result, tmp_path / "lat.json"))
    assert "1.75x" in md and "0.90x" not in md and "GPU X" in md and "CUDA graph" in md
    assert row["speedup_eager"] == {"cuda:b32": 0.9}
    plain = report.markdown({**result, "rows": [dict(row, speedup={"cuda:b32": 0.9})], "latency": None})
    assert "0.90x" in plain and "Caveat on the cuda columns" in plain


def test_base_config_falls_back_to_known_shapes(monkeypatch):
    """The GPU machine has no weight packages: the offline names still give their shapes."""
    import compress.models.hub

    def missing(name, cache=None):
        raise UserError(f"model {name!r} needs its weight packages")

    monkeypatch.setattr(compress.models.hub, "resolve_model", missing)
    config, source = el.base_config("mpnet-base")
    assert (config.model_type, config.hidden_size, config.num_hidden_layers, config.num_labels) == ("mpnet", 768, 12, 2)
    assert "weight packages" in source
    with pytest.raises(UserError):
        el.base_config("not-a-model")


@pytest.mark.parametrize("name", sorted(el.KNOWN_BASES))
def test_known_bases_match_the_offline_configs(name):
    from compress.models.hub import offline_cache_path

    path = offline_cache_path(name) / "config.json"
    if not path.is_file():
        pytest.skip(f"{name} is not converted in the compress cache")
    config = json.loads(path.read_text())
    fields = el.KNOWN_BASES[name]
    assert {k: config.get(k) for k in fields} == fields


def test_glue_report_summarizes_latency_budgeted_rounds(tmp_path):
    def row(task, method, speedup, acc):
        return {"task": task, "method": method, "flops_ratio": 0.49, "dense": {"accuracy": 90.0},
                "metrics": {"accuracy": acc, "num_examples": 10}, "speedup": {"cuda:b32": speedup}}
    rounds = {"rounds": [{"name": "R", "rows": [row("sst2", "fisher", 1.5, 90.0),
                                                 row("sst2", "fisher-speedup1.65", 1.62, 89.5),
                                                 row("rte", "fisher-speedup1.65", 1.60, 91.0)]}]}
    (tmp_path / "ls.json").write_text(json.dumps(rounds))
    lines = report.latency_search_summary([tmp_path / "ls.json", tmp_path / "absent.json"])
    budgeted = [line for line in lines if line.startswith("- ")]
    assert len(budgeted) == 1   # the FLOPs-only row is not a latency-budgeted one
    assert "`fisher-speedup1.65`: b32 1.60-1.62x" in budgeted[0]
    assert "sst2 -0.5, rte +1.0" in budgeted[0]
    assert report.latency_search_summary([tmp_path / "absent.json"]) == []
