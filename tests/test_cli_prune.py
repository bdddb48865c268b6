"""CLI end to end on a tiny model and task (finetune -> prune -> eval) and every bad input of issue 2:
one line on stderr, exit code 2, nothing written or overwritten."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from compress.models import checkpoint  # noqa: E402
from compress.cli import main  # noqa: E402
from _tiny import finetuned_tiny_sst2  # noqa: E402


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data, ft = finetuned_tiny_sst2(root)
    return root, data, ft


def test_finetune_prune_eval_end_to_end(work, capsys):
    root, data, ft = work
    out = root / "pruned"
    assert main(["prune", "--model", str(ft), "--task", "sst2", "--data-dir", str(data), "-o", str(out),
                 "--flops", "0.5", "--num-samples", "64", "--eval"]) == 0
    summary = capsys.readouterr().out
    assert "FLOPs kept" in summary and "dev before" in summary and "dev after" in summary
    record = json.loads((out / "prune.json").read_text())
    assert record["flops_ratio"] <= 0.5 + 1e-9
    assert set(record["seconds"]) >= {"fisher", "search", "rearrange", "tune", "slim"}
    assert record["recipe"]["flops"] == 0.5
    assert checkpoint.load(out).config.num_attention_heads_per_layer == record["num_attention_heads_per_layer"]
    assert main(["eval", str(out), "--task", "sst2", "--data-dir", str(data), "--json", str(root / "m.json")]) == 0
    metrics = json.loads((root / "m.json").read_text())["metrics"]
    assert metrics["accuracy"] == pytest.approx(record["eval_after"]["accuracy"])


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_baselines_meet_the_same_budget(work, method):
    root, data, ft = work
    out = root / f"pruned-{method}"
    assert main(["prune", "--model", str(ft), "--task", "sst2", "--data-dir", str(data), "-o", str(out),
                 "--flops", "0.6", "--num-samples", "32", "--method", method]) == 0
    assert json.loads((out / "prune.json").read_text())["flops_ratio"] <= 0.6 + 1e-9


def test_model_fisher_runs_end_to_end_and_is_recorded(work):
    root, data, ft = work
    out = root / "pruned-model-fisher"
    assert main(["prune", "--model", str(ft), "--task", "sst2", "--data-dir", str(data), "-o", str(out),
                 "--flops", "0.5", "--num-samples", "32", "--fisher", "model"]) == 0
    record = json.loads((out / "prune.json").read_text())
    assert record["recipe"]["fisher"] == "model" and record["flops_ratio"] <= 0.5 + 1e-9


@pytest.mark.parametrize("flag,weights", [([], True), (["--no-tune-weights"], False)])
def test_weight_or_mask_tuning_runs_end_to_end(work, flag, weights, capsys):
    root, data, ft = work
    out = root / f"pruned-tuned-{weights}"
    assert main(["prune", "--model", str(ft), "--task", "sst2", "--data-dir", str(data), "-o", str(out),
                 "--flops", "0.5", "--num-samples", "32", *flag]) == 0
    assert f"{{'flops': 0.5}}, tuned {'weights' if weights else 'masks'})" in capsys.readouterr().out
    record = json.loads((out / "prune.json").read_text())
    assert record["recipe"]["tune_weights"] is weights and "tune" in record["seconds"]
    assert all(layer["ffn"]["error_after"] <= layer["ffn"]["error_before"] for layer in record["tune"])
    from compress.arch import get_adapter

    assert get_adapter(checkpoint.load(out)).num_heads() == record["num_attention_heads_per_layer"]


def test_recipe_maps_onto_config_and_flags_override(work, tmp_path):
    root, data, ft = work
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {ft}\ntask: sst2\nflops: 0.3\nnum_samples: 32\ntune: false\ndata_dir: {data}\n")
    out = tmp_path / "out"
    assert main(["prune", "--recipe", str(recipe), "--flops", "0.7", "-o", str(out)]) == 0
    record = json.loads((out / "prune.json").read_text())
    assert record["recipe"]["flops"] == 0.7 and record["recipe"]["tune"] is False
    assert "tune" not in record["seconds"]


def test_search_steps_run_end_to_end_and_are_recorded(work, capsys):
    root, data, ft = work
    out = root / "pruned-steps"
    assert main(["prune", "--model", str(ft), "--task", "sst2", "--data-dir", str(data), "-o", str(out),
                 "--flops", "0.5", "--num-samples", "32", "--search-steps", "3"]) == 0
    assert "search steps: FLOPs 0.833 -> " in capsys.readouterr().out
    record = json.loads((out / "prune.json").read_text())
    assert record["recipe"]["search_steps"] == 3 and record["flops_ratio"] <= 0.5 + 1e-9
    assert [s["flops"] for s in record["steps"]] == pytest.approx([5 / 6, 2 / 3, 0.5])
    for before, after in zip(record["steps"], record["steps"][1:]):
        assert all(a <= b for a, b in zip(after["heads"] + after["filters"], before["heads"] + before["filters"]))
    assert record["num_attention_heads_per_layer"] == record["steps"][-1]["heads"]
    assert [f - z for f, z in zip(record["intermediate_size_per_layer"], record["zero_filters_per_layer"])] == \
        record["steps"][-1]["filters"]
    assert set(record["seconds"]) >= {"fisher", "search", "rearrange", "tune"}


def test_search_steps_recipe_round_trip(work, tmp_path):
    import yaml

    from compress.pruning.config import PruneConfig
    from compress.recipes import load_recipe, resolve

    root, data, ft = work
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {ft}\ntask: sst2\nflops: 0.6\nnum_samples: 32\nsearch_steps: 2\ndata_dir: {data}\n")
    out = tmp_path / "out"
    assert main(["prune", "--recipe", str(recipe), "-o", str(out)]) == 0
    record = json.loads((out / "prune.json").read_text())
    assert record["recipe"]["search_steps"] == 2 and len(record["steps"]) == 2
    saved = tmp_path / "saved.yaml"
    saved.write_text(yaml.safe_dump(record["recipe"]))
    assert resolve(PruneConfig, load_recipe(saved)) == PruneConfig(**record["recipe"])
    assert resolve(PruneConfig, load_recipe(recipe), output="o", search_steps=4).search_steps == 4  # flag wins


def _bad(work, tmp_path, capsys, argv, message):
    root, data, ft = work
    argv = [a.format(ft=ft, data=data, root=root, tmp=tmp_path) for a in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temp dir left


PRUNE = ["prune", "--task", "sst2", "--data-dir", "{data}", "-o", "{tmp}/out"]


@pytest.mark.parametrize("argv,message", [
    (["prune", "--model", "no-such-model-xyz", "--task", "sst2", "-o", "{tmp}/out", "--flops", "0.5"], "unknown model"),
    (PRUNE[:2] + ["imagenet"] + PRUNE[3:] + ["--model", "{ft}", "--flops", "0.5"], "unknown task"),
    (PRUNE + ["--model", "{ft}", "--flops", "0"], "--flops must be in (0, 1]"),
    (PRUNE + ["--model", "{ft}", "--flops", "1.5"], "--flops must be in (0, 1]"),
    (PRUNE + ["--model", "{ft}", "--flops", "0.5", "--search-steps", "0"], "--search-steps must be an integer >= 1"),
    (PRUNE + ["--model", "{ft}", "--flops", "0.5", "--search-steps=-1"], "--search-steps must be an integer >= 1"),
    (PRUNE + ["--model", "{ft}", "--search-steps", "2"], "give a constraint"),
    (PRUNE + ["--model", "{root}/base", "--flops", "0.5"], "no sequence-classification head"),
    (["prune", "--task", "mnli", "--data-dir", "{data}", "-o", "{tmp}/out", "--model", "{ft}", "--flops", "0.5"],
     "has 2 labels but task mnli has 3"),
    (["prune", "--task", "sst2", "--data-dir", "{tmp}/missing", "-o", "{tmp}/out", "--model", "{ft}", "--flops", "0.5"],
     "does not exist"),
])
def test_bad_inputs_exit_2_with_one_line(work, tmp_path, capsys, argv, message):
    _bad(work, tmp_path, capsys, argv, message)


def test_search_steps_that_are_not_integers_exit_2_with_one_line(work, tmp_path, capsys):
    root, data, ft = work
    with pytest.raises(SystemExit) as exit_info:  # argparse's own type check (compress.cli._Parser)
        main(["prune", "--model", str(ft), "--task", "sst2", "--data-dir", str(data), "-o", str(tmp_path / "out"),
              "--flops", "0.5", "--search-steps", "x"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "--search-steps: invalid int value" in err
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(work, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    _bad(work, tmp_path, capsys, PRUNE + ["--model", "{ft}", "--flops", "0.5"], "--overwrite")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_corrupt_and_partial_checkpoints(work, tmp_path, capsys):
    import shutil

    root, data, ft = work
    bad = tmp_path / "bad"
    shutil.copytree(ft, bad)
    weights = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(weights[:1000])
    _bad(work, tmp_path, capsys, PRUNE + ["--model", str(bad), "--flops", "0.5"], "corrupt or incomplete")
    (bad / "model.safetensors").unlink()
    _bad(work, tmp_path, capsys, PRUNE + ["--model", str(bad), "--flops", "0.5"], "no model.safetensors")


def test_shipped_recipes_map_onto_the_config():
    from compress.pruning.config import PruneConfig
    from compress.recipes import load_recipe, resolve
    from compress.train.config import FinetuneConfig
    from compress.token_pruning.config import TokenPruningConfig

    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        kinds = {"finetune": FinetuneConfig, "token-prune": TokenPruningConfig}
        cls = next((c for k, c in kinds.items() if k in path.name), PruneConfig)
        if not ("minilm" in path.name or "mpnet" in path.name):
            continue  # other subsystems' recipes
        config = resolve(cls, load_recipe(path))
        assert config.model and config.task
        assert path.read_text().startswith("#")  # header comment with the command


def test_api_functions_survive_importing_every_module():
    """`compress.pruning` / `compress.finetune` stay the API functions once the CLI's modules are imported
    (a submodule of the same name would replace the attribute on the package)."""
    import importlib
    import pkgutil

    import compress

    for info in pkgutil.walk_packages(compress.__path__, "compress."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    for name in ("prune", "finetune", "load", "evaluate"):
        assert callable(getattr(compress, name)), name
