"""Broken model directories (issue 33, problem 5): a truncated, empty or garbled safetensors file, wrong
head or layer counts in config.json, or missing tokenizer files give one line on stderr and exit 2 from
`compress serve`, `compress eval` and `compress prune`, never a traceback or a model that answers
nothing; leftover temporary output directories of killed runs are removed by the next run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from compress.cli import main
from compress.models.outputs import atomic_output_dir
from serve_fixtures import gemma3_config, random_model, save_model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    (root / "calib.txt").write_text("the quick brown fox jumps over the lazy dog, hello world " * 40)
    return save_model(random_model(gemma3_config(2), seed=5), root / "good"), root / "calib.txt"


def _config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _weights(path, cut):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(cut(data))


BROKEN = {
    "truncated weights": (lambda p: _weights(p, lambda b: b[:len(b) // 2]), "corrupt or incomplete (truncated"),
    "empty weights": (lambda p: _weights(p, lambda b: b""), "corrupt or incomplete (empty)"),
    "garbled header": (lambda p: _weights(p, lambda b: b[:8] + b"{garbage" + b[16:]), "corrupt or incomplete (unreadable header)"),
    "wrong head count": (lambda p: _config(p, num_attention_heads=8), "query heads x head_dim"),
    "wrong KV head count": (lambda p: _config(p, num_key_value_heads=4), "KV heads x head_dim"),
    "heads not shared evenly": (lambda p: _config(p, num_key_value_heads_per_layer=[2, 3]), "cannot share"),
    "more layers than weights": (lambda p: _config(p, num_hidden_layers=3), "has 2 entries for num_hidden_layers=3"),
    "fewer layers than weights": (lambda p: _config(p, num_hidden_layers=1, layer_types=["sliding_attention"]),
                                  "says 1 layers, the weights hold 2"),
    "short per-layer list": (lambda p: _config(p, intermediate_size_per_layer=[96]), "has 1 entries"),
    "no tokenizer": (lambda p: [f.unlink() for f in p.iterdir() if f.name.startswith("tokenizer")],
                     "no tokenizer files"),
}


def _command(name, path, calib, tmp_path):
    return {"serve": ["serve", str(path), "--device", "cpu"],
            "eval": ["eval", str(path), "--perplexity", str(calib), "--ppl-seq-len", "16", "--device", "cpu"],
            "prune": ["prune", "--model", str(path), "--flops", "0.8", "--calib", str(calib), "-o",
                      str(tmp_path / "out"), "--num-samples", "2", "--seq-len", "16", "--device", "cpu"]}[name]


@pytest.mark.parametrize("command", ["serve", "eval", "prune"])
@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_checkpoint_is_one_line_and_exit_2(good, tmp_path, capsys, monkeypatch, kind, command):
    import serve.server
    monkeypatch.setattr(serve.server, "serve_forever", lambda *a, **k: pytest.fail("served a broken checkpoint"))
    path, calib = good
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    breaks, message = BROKEN[kind]
    breaks(bad)
    capsys.readouterr()
    assert main(_command(command, bad, calib, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_the_intact_checkpoint_passes_every_check(good):
    from compress.models.checks import check_checkpoint
    check_checkpoint(good[0], tokenizer=True)


def test_next_run_removes_the_temporary_directory_of_a_killed_run(tmp_path):
    out = tmp_path / "out"
    code = ("import sys, time; from compress.models.outputs import atomic_output_dir\n"
            "with atomic_output_dir(sys.argv[1]) as tmp:\n"
            "    (tmp / 'half.bin').write_bytes(b'x'); print(tmp, flush=True); time.sleep(60)")
    writer = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    left = writer.stdout.readline().strip()
    writer.kill()                                  # killed mid-write: no cleanup of its own
    writer.wait()
    assert left.startswith(str(tmp_path / ".out.tmp-")) and os.path.isdir(left)
    legacy = tmp_path / ".out.tmp-k3j9x_ab"        # named before the pid was part of the name
    dead = tmp_path / f".out.tmp-{writer.pid + 10**7}-x"      # beyond any pid: no such process
    mine = tmp_path / f".out.tmp-{os.getpid()}-busy"          # a writer still running: kept
    for folder in (legacy, dead, mine):
        folder.mkdir()
    with atomic_output_dir(out) as tmp:
        (tmp / "model.bin").write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", mine.name])
