"""`compress prune --device-map`: a decoder spread over devices while it is pruned.

Without GPUs, the placement arithmetic (compress.pruning.placement) is tested as the pure function it is,
and the map built for two GPUs from a model's shapes with the GPU queries faked. The whole run goes
through accelerate's dispatch with every module on `cpu` (hooks on, as on GPUs) for tiny Gemma 2 and
Gemma 3 models (and a slimmed one, pruned again) and must give the run without a device map: the same
masks, slimmed weights and record.
What only GPUs show (tensors crossing devices, memory) is not tested here.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_gemma_prune import WORDS, _model, _tokenizer

from compress.arch.gemma import GemmaAdapter
from compress.cli import main
from compress.errors import UserError
from compress.models import checkpoint
from compress.pruning.placement import describe, layer_runs, place_layers
from compress.pruning.slim import slim_model

GPUS = {"cuda:0": 10, "cuda:1": 10}


def test_auto_fills_each_device_in_turn():
    assert place_layers([3] * 4, 2, GPUS) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert place_layers([3] * 4, 2, {"cuda:0": 100, "cuda:1": 100}) == ["cuda:0"] * 4


def test_balanced_shares_bytes_by_capacity():
    assert place_layers([3] * 8, 0, {f"cuda:{i}": 100 for i in range(4)}, balanced=True) == \
        [f"cuda:{i // 2}" for i in range(8)]
    assert place_layers([1] * 9, 0, {"cuda:0": 200, "cuda:1": 100}, balanced=True) == ["cuda:0"] * 6 + ["cuda:1"] * 3
    assert place_layers([3] * 4, 2, {"cuda:0": 100, "cuda:1": 100}, balanced=True) == ["cuda:0"] * 2 + ["cuda:1"] * 2
    assert place_layers([5, 5], 0, {f"cuda:{i}": 100 for i in range(4)}, balanced=True) == ["cuda:0", "cuda:1"]


@pytest.mark.parametrize("layers, first, match", [
    ([3] * 8, 0, "needs about"),  # 24 bytes on 20
    ([6, 6, 6], 0, "layer 2 does not fit on cuda:1"),  # 18 bytes fit 20, but not whole layers
    ([1], 12, "do not fit on cuda:0"),
])
def test_placement_refuses_what_does_not_fit(layers, first, match):
    with pytest.raises(UserError, match=match):
        place_layers(layers, first, GPUS)


def test_placement_is_described_in_one_line():
    devices = ["cuda:0", "cuda:0", "cuda:1"]
    assert layer_runs(devices) == {"cuda:0": (0, 1), "cuda:1": (2, 2)}
    line = describe(devices, "cuda:0")
    assert "\n" not in line and "cuda:0 layers 0-1, cuda:1 layer 2" in line and "2 device(s)" in line


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("spread")
    g = torch.Generator().manual_seed(0)
    (root / "calib.txt").write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (600,), generator=g)))
    for kind in ("gemma2", "gemma3"):
        _model(kind).save_pretrained(root / kind)
        _tokenizer().save_pretrained(root / kind)
    slimmed = _model("gemma3")  # uneven layers: a slimmed checkpoint loads on the CPU, then is dispatched
    slim_model(GemmaAdapter(slimmed), [torch.tensor([1.0, 1, 0, 0]), torch.tensor([0.0, 0, 1, 1])],
               [torch.ones(48), (torch.arange(48) < 40).float()])
    checkpoint.save(slimmed, _tokenizer(), root / "slimmed", {})
    modules = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "model.rotary_emb", "lm_head"]
    (root / "cpu.json").write_text(json.dumps(dict.fromkeys(modules, "cpu")))
    return root


def _config(dense, kind, out, **kwargs):
    from compress.pruning.config import PruneConfig

    return PruneConfig(model=str(dense / kind), output=str(out), flops=0.6, calib=str(dense / "calib.txt"),
                       num_samples=8, seq_len=16, context_len=32, batch_size=4, **kwargs)


def _prune(config):
    from compress.pruning.pipeline import Pipeline

    pipe = Pipeline(config, progress=False)
    model, tok = pipe.prune()
    return pipe, model, tok


@pytest.mark.parametrize("kind, method, tune_weights", [
    ("gemma2", "fisher-group", False), ("gemma3", "fisher-group", False), ("gemma3", "fisher", True),
    ("slimmed", "activation", False),
])
def test_spread_run_equals_the_run_on_one_device(dense, tmp_path, capsys, kind, method, tune_weights):
    settings = {"method": method, "tune_weights": tune_weights}
    one, reference, tok = _prune(_config(dense, kind, tmp_path / "one", device="cpu", **settings))
    pipe, model, _ = _prune(_config(dense, kind, tmp_path / "spread", device_map=str(dense / "cpu.json"), **settings))
    assert getattr(model, "_hf_hook", None) is not None  # accelerate's hooks were on through every stage
    assert "compress: spread over 1 device(s): cpu layers 0-1; embedding, final norm and LM head on cpu\n" in \
        capsys.readouterr().out
    assert all(getattr(b, "_hf_hook", None) is not None for b in model.model.layers)
    one.save(reference, tok)
    pipe.save(model, tok)
    assert getattr(model, "_hf_hook", None) is None  # gathered to the CPU to be saved
    want, got = checkpoint.read_weights(tmp_path / "one"), checkpoint.read_weights(tmp_path / "spread")
    assert sorted(want) == sorted(got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    want, got = (json.loads((tmp_path / d / "prune.json").read_text()) for d in ("one", "spread"))
    assert got.pop("placement") == {"cpu": [0, 1]}
    assert got["recipe"].pop("device_map") == str(dense / "cpu.json") and want["recipe"].pop("device_map") is None
    for record in (want, got):
        record.pop("seconds"), record["recipe"].pop("output"), record["recipe"].pop("device")
    assert _close(got, want)


def _close(a, b) -> bool:
    """Equal records, floats within 1e-5 relative."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return b == pytest.approx(a, rel=1e-5, abs=1e-9)
    return a == b


def _fake_gpus(monkeypatch, count: int, free_gib: float = 80.0):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * 2 ** 30), 80 * 2 ** 30))


@pytest.mark.parametrize("spec, layer_devices", [("balanced", ["cuda:0", "cuda:1"]), ("auto", ["cuda:0", "cuda:0"])])
def test_map_for_two_gpus_places_whole_layers_and_the_rest_on_the_first(dense, monkeypatch, spec, layer_devices):
    from types import SimpleNamespace

    from accelerate.utils import check_device_map

    from compress.pruning.spread import _skeleton, plan

    _fake_gpus(monkeypatch, 2)
    sizes = SimpleNamespace(batch_size=4, seq_len=16, num_samples=8)
    device_map, devices, main = plan(dense / "gemma3", torch.float32, spec, sizes)
    assert devices == layer_devices and main == "cuda:0"
    assert [device_map[f"model.layers.{i}"] for i in range(2)] == layer_devices
    assert {d for k, d in device_map.items() if "layers" not in k} == {"cuda:0"}
    check_device_map(_skeleton(dense / "gemma3", torch.float32), device_map)  # every weight has a device


@pytest.mark.parametrize("gpus, free_gib, spec, extra, match", [
    (0, 80, "auto", [], "none is visible"),
    (2, 0.5, "balanced", [], "needs about"),  # less free than the reserve: nothing fits
    (2, 80, "nonsense", [], "must be auto, balanced or a JSON file"),
    (2, 80, "auto", ["--device", "cpu"], "not both"),
    (2, 80, "auto", ["--distill-tokens", "64"], "--distill-tokens does not run"),
    (2, 80, {"model.layers.1": "cuda:3"}, [], "names cuda:3, but this machine has 2 GPU(s)"),
    (0, 80, {"model.layers.1": 0}, [], "names cuda:0, but this machine has no GPU"),
    (2, 80, {"model.layers.1": "cuda:1"}, [], "part of the model on cpu"),
    (2, 80, {"model.layers.1": "disk"}, [], "disk offload is not supported"),
    (0, 80, {"model.layers.1.mlp": "cpu"}, [], "splits model.layers.1: place whole layers"),
    (0, 80, {"model.layer.1": "cpu"}, [], "names no module of this model"),
    (0, 80, {"lm_head": None}, [], "does not give any device"),
    (0, 80, "BROKEN", [], "is not valid JSON"),
])
def test_bad_device_maps_exit_2_with_one_line(dense, tmp_path, monkeypatch, capsys, gpus, free_gib, spec, extra, match):
    _fake_gpus(monkeypatch, gpus, free_gib)
    if spec == "BROKEN":
        (tmp_path / "map.json").write_text('{"lm_head": ')
        spec = str(tmp_path / "map.json")
    if isinstance(spec, dict):  # the all-cpu map of the fixture, changed as given (None: the key left out)
        changed = {**json.loads((dense / "cpu.json").read_text()), **spec}
        (tmp_path / "map.json").write_text(json.dumps({k: v for k, v in changed.items() if v is not None}))
        spec = str(tmp_path / "map.json")
    args = ["prune", "--model", str(dense / "gemma3"), "--flops", "0.6", "--calib", str(dense / "calib.txt"),
            "--num-samples", "8", "--seq-len", "16", "--batch-size", "4", "-o", str(tmp_path / "o"),
            "--device-map", spec]
    capsys.readouterr()
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_device_map_is_for_decoders_only(tmp_path, capsys):
    from _tiny import save_tiny_model_dir

    save_tiny_model_dir(tmp_path / "bert", "bert")
    capsys.readouterr()
    assert main(["prune", "--model", str(tmp_path / "bert"), "--task", "sst2", "--flops", "0.5", "-o",
                 str(tmp_path / "o"), "--device-map", "auto"]) == 2
    assert "--device-map applies only to a decoder" in capsys.readouterr().err


def test_cli_takes_a_device_map_from_a_recipe(dense, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {dense / 'gemma2'}\nflops: 0.7\nnum_samples: 4\nseq_len: 16\ncontext_len: 32\n"
                      f"calib: {dense / 'calib.txt'}\ndevice_map: {dense / 'cpu.json'}\n")
    assert main(["prune", "--recipe", str(recipe), "-o", str(tmp_path / "out")]) == 0
    assert "spread over 1 device(s): cpu layers 0-1" in capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "prune.json").read_text())
    assert record["placement"] == {"cpu": [0, 1]} and record["recipe"]["device_map"] == str(dense / "cpu.json")
