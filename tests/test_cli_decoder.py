"""`compress prune` / `compress eval` / `compress.load` on a tiny random Gemma 3 decoder (no --task):
prune end to end with a calibration file, load and generate, perplexity, the config keys the
runtime reads, and the bad inputs (one line on stderr, exit code 2, nothing written)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from compress.cli import main
from test_gemma_prune import WORDS, _model, _tokenizer


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoder")
    model, tok = _model("gemma3"), _tokenizer()
    model.save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")
    g = torch.Generator().manual_seed(0)
    text = root / "calib.txt"
    text.write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (600,), generator=g)))
    out = root / "out"
    assert main(["prune", "--model", str(root / "dense"), "--flops", "0.8", "--calib", str(text), "-o", str(out),
                 "--num-samples", "8", "--seq-len", "16", "--context-len", "32", "--device", "cpu"]) == 0
    return root, text, out


def test_prune_writes_a_slimmed_decoder_within_budget(pruned, capsys):
    root, text, out = pruned
    record = json.loads((out / "prune.json").read_text())
    assert record["flops_ratio"] <= 0.8 + 1e-9 and record["recipe"]["flops"] == 0.8
    assert record["calibration"] == f"text from {text}" and record["num_samples"] == 8


def test_compress_load_generates(pruned):
    import compress
    from compress.arch.gemma import GemmaAdapter

    model = compress.load(pruned[2])
    saved = json.loads((pruned[2] / "config.json").read_text())
    assert GemmaAdapter(model).num_filters() == saved["intermediate_size_per_layer"]
    prompt = torch.tensor([[2, 5, 9, 11]])
    ids = model.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert ids.shape == (1, 10) and torch.equal(ids[:, :4], prompt)


def test_eval_perplexity_prints_a_number(pruned, capsys):
    root, text, out = pruned
    capsys.readouterr()
    assert main(["eval", str(out), "--perplexity", str(text), "--ppl-seq-len", "16", "--device", "cpu"]) == 0
    ppl = float(re.match(r"perplexity ([0-9.]+) ", capsys.readouterr().out).group(1))
    assert 1.0 < ppl < 10 * len(WORDS)


def test_config_has_the_keys_the_runtime_reads(pruned):
    from serve.models.gemma_config import spec_from_config

    cfg = json.loads((pruned[2] / "config.json").read_text())
    spec = spec_from_config(cfg)
    assert spec.num_attention_heads == cfg["num_attention_heads_per_layer"]
    assert spec.num_key_value_heads == cfg["num_key_value_heads_per_layer"]
    assert spec.intermediate_size == cfg["intermediate_size_per_layer"]
    assert sum(spec.intermediate_size) < 2 * 48 or sum(spec.num_attention_heads) < 2 * 4  # something was pruned


@pytest.mark.parametrize("extra, match", [
    (["--calib", ""], "--calib is empty"),
    (["--calib", "EMPTY"], "is empty"),
    (["--flops", "1.5"], "--flops must be in"),
    (["--max-seq-length", "64"], "--max-seq-length applies only to an encoder"),
    (["--search-steps", "2"], "--search-steps applies only to an encoder"),
    (["--fisher", "model"], "--fisher applies only to an encoder"),
])
def test_bad_decoder_inputs_exit_2_with_one_line(pruned, tmp_path, capsys, extra, match):
    root, _, _ = pruned
    (tmp_path / "empty.txt").write_text("\n")
    extra = [str(tmp_path / "empty.txt") if a == "EMPTY" else a for a in extra]
    args = ["prune", "--model", str(root / "dense"), "--flops", "0.8", "-o", str(tmp_path / "o"), "--device", "cpu"]
    capsys.readouterr()
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_unknown_model_and_encoder_without_task_exit_2(tmp_path, capsys, monkeypatch):
    from _tiny import save_tiny_model_dir

    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    save_tiny_model_dir(tmp_path / "bert", "bert")
    for model, match in [("no-such-model-xyz", "no-such-model-xyz"), (str(tmp_path / "bert"), "task")]:
        capsys.readouterr()
        assert main(["prune", "--model", model, "--flops", "0.8", "-o", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err
    capsys.readouterr()
    assert main(["prune", "--model", str(tmp_path / "bert"), "--task", "sst2", "--flops", "0.8", "--method",
                 "activation", "-o", str(tmp_path / "o")]) == 2
    assert "decoders only" in capsys.readouterr().err


def test_eval_needs_task_or_perplexity(pruned, capsys):
    capsys.readouterr()
    assert main(["eval", str(pruned[2])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--perplexity" in err


def test_decoder_recipe_and_flags_override(pruned, tmp_path):
    root, text, _ = pruned
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {root / 'dense'}\nflops: 0.5\nmethod: fisher-mlp\nnum_samples: 4\nseq_len: 16\n"
                      f"context_len: 32\ncalib: {text}\ndevice: cpu\n")
    out = tmp_path / "out"
    assert main(["prune", "--recipe", str(recipe), "--flops", "0.9", "-o", str(out)]) == 0
    record = json.loads((out / "prune.json").read_text())
    assert record["method"] == "fisher-mlp" and record["recipe"]["flops"] == 0.9 and record["num_samples"] == 4
    assert record["num_attention_heads_per_layer"] == [4, 4]  # fisher-mlp keeps every head


def test_runtime_serves_a_checkpoint_with_an_empty_attention_layer(tmp_path):
    """compress writes no q/k/v projections or QK-norms for a 0-head layer; the runtime must still load it."""
    from compress.models import checkpoint
    from compress.arch.gemma import GemmaAdapter
    from compress.pruning.slim import slim_model
    from serve import LLM, SamplingParams
    from serve_fixtures import hf_greedy

    model, tok = _model("gemma3"), _tokenizer()
    heads, filters = [torch.ones(4), torch.zeros(4)], [torch.ones(48), (torch.arange(48) < 20).float()]
    slim_model(GemmaAdapter(model), heads, filters)
    checkpoint.save(model, tok, tmp_path, {})
    assert not any("layers.1.self_attn.k_norm" in k for k in checkpoint.read_weights(tmp_path))
    loaded = checkpoint.load(tmp_path)
    prompt = [2, 5, 9, 11, 7]
    out = LLM(tmp_path, block_size=4).generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_greedy(loaded, prompt, 6)
