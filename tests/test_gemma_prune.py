"""Gemma 2 / Gemma 3 decoder pruning on tiny seeded random models (2 layers, hidden 64, GQA 2 kv x 2 q).

Both models use a sliding window (8) shorter than the test sequences (16) on layer 0; Gemma 2 has
attention and final-logit soft-capping on. Invariants: all-ones masks are the identity, the slimmed
model equals the masked-and-scaled model, the GQA rule holds, the search meets its budget (and is
optimal on a brute-forced toy problem), the pipeline's output loads back to the same logits.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from compress.pruning import decoder_cost, gqa
from compress.arch.gemma import GemmaAdapter, load_causal_lm

WORDS = ("the a of and to in is was for on with as by at from his her it that this "
         "king queen river city north south old new great small house field war peace").split()


def _config(kind: str):
    from transformers import Gemma2Config, Gemma3TextConfig

    common = dict(vocab_size=len(WORDS) + 4, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                  query_pre_attn_scalar=16, max_position_embeddings=64, bos_token_id=2, eos_token_id=1,
                  pad_token_id=0, layer_types=["sliding_attention", "full_attention"])
    if kind == "gemma2":
        return Gemma2Config(attn_logit_softcapping=20.0, final_logit_softcapping=15.0, **common)
    return Gemma3TextConfig(**common)


def _model(kind: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = _config(kind)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # Gemma initialises norm weights to 0 (scale 1); random ones test the folding better
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return model


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def _ids(n=3, length=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, len(WORDS) + 4, (n, length), generator=g)
    ids[:, 0] = 2
    return ids


def _gqa_masks(adapter, seed=0):
    """Random GQA-shaped masks with random nonzero scales; layer 1 drops a whole kv group."""
    g = torch.Generator().manual_seed(seed)
    heads = [torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 1.0, 1.0])]
    heads = [m * (0.5 + torch.rand(4, generator=g)) for m in heads]
    filters = [(torch.rand(f, generator=g) > 0.4).float() * (0.5 + torch.rand(f, generator=g)) for f in adapter.num_filters()]
    return heads, filters


@pytest.fixture(params=["gemma2", "gemma3"])
def kind(request):
    return request.param


def test_all_ones_masks_are_identity(kind):
    model = _model(kind)
    adapter, ids = GemmaAdapter(model), _ids()
    dense = model(input_ids=ids).logits
    with adapter.masks(*adapter.ones_masks()):
        masked = model(input_ids=ids).logits
    assert torch.equal(dense, masked)
    assert adapter.sliding_windows() == [8, None] and adapter.num_kv_heads() == [2, 2]


def test_slimmed_equals_masked_and_scaled(kind):
    from compress.pruning.slim import slim_model

    model = _model(kind)
    adapter, ids = GemmaAdapter(model), _ids()
    heads, filters = _gqa_masks(adapter)
    with torch.no_grad(), adapter.masks(heads, filters):
        masked = model(input_ids=ids).logits
    slim_model(adapter, heads, filters)
    with torch.no_grad():
        slim = model(input_ids=ids).logits
    assert adapter.num_heads() == [2, 2] and adapter.num_kv_heads() == [2, 1]
    assert model.config.num_key_value_heads_per_layer == [2, 1]
    torch.testing.assert_close(slim, masked, rtol=1e-4, atol=1e-4)


def test_zero_head_layer_generates_with_cache(kind):
    from compress.pruning.slim import slim_model

    model = _model(kind)
    adapter = GemmaAdapter(model)
    heads = [torch.zeros(4), torch.ones(4)]
    slim_model(adapter, heads, [torch.ones(f) for f in adapter.num_filters()])
    ids = _ids(1, 12)
    with torch.no_grad():  # the 0-head layer keeps its cache layer in step (transformers passes it as
        prefill = model(input_ids=ids, use_cache=True)  # `cache` from 5.25, `past_key_values` before)
    cache = getattr(prefill, "cache", None) or prefill.past_key_values
    assert [cache.get_seq_length(layer) for layer in range(2)] == [12, 12]
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    with torch.no_grad():  # greedy with the cache must match step-by-step full recomputation
        seq = ids
        for _ in range(6):
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def _feasible(mask, group):
    kept = (mask != 0).view(-1, group).sum(1)
    return len(set(kept[kept > 0].tolist())) <= 1


def test_layer_options_are_gqa_shaped_and_best_per_shape():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.4, 0.05, 0.7])  # 3 kv groups of 2
    options = gqa.layer_options(scores, group=2)
    for heads, kv, value, mask in options:
        assert _feasible(mask, 2) and int(mask.sum()) == heads
        assert gqa_kept_kv(mask, 2) == kv and value == pytest.approx(float((scores * mask).sum()))
        brute = max(float((scores * torch.tensor(m, dtype=torch.float)).sum())
                    for m in itertools.product([0, 1], repeat=6)
                    if sum(m) == heads and _feasible(torch.tensor(m), 2) and gqa_kept_kv(torch.tensor(m), 2) == kv)
        assert value == pytest.approx(brute)


def gqa_kept_kv(mask, group):
    return decoder_cost.kept_kv_heads(torch.as_tensor(mask), group)


def test_search_meets_budget_and_matches_brute_force(kind):
    adapter = GemmaAdapter(_model(kind))
    cost = decoder_cost.decoder_cost(adapter, context_len=16)
    g = torch.Generator().manual_seed(3)
    head_scores = [torch.rand(4, generator=g) for _ in range(2)]
    filter_scores = [torch.rand(f, generator=g) for f in adapter.num_filters()]
    per_layer = [gqa.layer_options(s, 2) for s in head_scores]
    ranked = torch.cat(filter_scores).sort(descending=True).values
    for ratio in (0.9, 0.6, 0.35):
        budget = ratio * cost.dense_flops()
        heads, filters = gqa.search_gqa(head_scores, filter_scores, cost, budget, [2, 2])
        assert all(_feasible(m, 2) for m in heads)
        flops = cost.flops_of_masks(heads, filters, [2, 2])
        assert flops <= budget * (1 + 1e-9)
        got = sum(float((s * m).sum()) for s, m in zip(head_scores + filter_scores, heads + filters))
        best = 0.0
        for combo in itertools.product(*per_layer):
            used = sum(cost.layer_flops(l, h, k, 0) for l, (h, k, _, _) in enumerate(combo))
            if used <= budget:
                n = int((budget - used) // cost.filter_cost[0])
                best = max(best, sum(o[2] for o in combo) + float(ranked[:n].sum()))
        assert got == pytest.approx(best, rel=1e-6)


def test_rearrange_keeps_gqa_shape_and_never_raises_objective():
    from compress.pruning.rearrange import block_fisher, objective

    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(32, 8, generator=g)]
    mask = torch.tensor([1.0, 0, 1, 0, 0, 0, 0, 0])  # 2 groups of 1 head, group size 2
    (out,) = gqa.rearrange_gqa([mask], grads, [2])
    assert _feasible(out, 2) and int(out.sum()) == 2 and gqa_kept_kv(out, 2) == 2
    assert objective(out, block_fisher(grads[0])) <= objective(mask, block_fisher(grads[0])) + 1e-12


def test_attended_pairs_match_a_count():
    for c, w in [(16, 8), (16, None), (5, 8), (9, 1)]:
        brute = sum(1 for i in range(c) for j in range(i + 1) if w is None or i - j < w)
        assert decoder_cost.attended_pairs(c, w) == brute


def test_prune_decoder_saves_a_checkpoint_that_loads_back(kind, tmp_path):
    from compress.pruning.config import PruneConfig
    from compress.pruning.pipeline import Pipeline

    model, tok = _model(kind), _tokenizer()
    src = tmp_path / "dense"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    text = tmp_path / "calib.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (600,), generator=g)))
    out = tmp_path / "pruned"
    config = PruneConfig(model=str(src), output=str(out), flops=0.6, calib=str(text), num_samples=8,
                         seq_len=16, context_len=32, batch_size=4, device="cpu")
    pipe = Pipeline(config, progress=False)
    pruned, _ = pipe.prune()
    record = pipe.record
    pipe.save(pruned, tok)
    assert record["flops_after"] <= 0.6 * record["flops_before"] * (1 + 1e-9)
    saved = json.loads((out / "config.json").read_text())
    heads, kv = saved["num_attention_heads_per_layer"], saved["num_key_value_heads_per_layer"]
    assert all(k == 0 and h == 0 or h % k == 0 for h, k in zip(heads, kv))
    loaded = load_causal_lm(out)
    assert GemmaAdapter(loaded).num_heads() == heads
    assert GemmaAdapter(loaded).num_filters() == saved["intermediate_size_per_layer"]
    ids = _ids()
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits
    assert torch.isfinite(logits).all() and (out / "prune.json").is_file() and (out / "tokenizer.json").is_file()
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=ids).logits, logits)
    assert record["calibration"].startswith("text from") and "tune" in record


def test_bad_inputs_are_one_line_user_errors(tmp_path):
    from compress.data import calib
    from compress.errors import UserError
    from compress.pruning.config import PruneConfig

    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "dir").mkdir()
    for path, match in [(tmp_path / "empty.txt", "is empty"), (tmp_path / "dir", "no .txt"),
                        (tmp_path / "missing", "does not exist")]:
        with pytest.raises(UserError, match=match):
            calib.read_text(path)
    for kwargs, match in [({"flops": 1.5}, "--flops"), ({"flops": 0.5, "method": "random"}, "--method"),
                          ({"flops": 0.5, "seq_len": 1}, "--seq-len")]:
        with pytest.raises(UserError, match=match):
            PruneConfig(model="m", output="o", **kwargs).for_family("decoder")


def test_checkpoint_not_matching_its_config_is_a_user_error(tmp_path):
    from compress.errors import UserError
    from compress.pruning.slim import slim_model

    model = _model("gemma3")
    adapter = GemmaAdapter(model)
    slim_model(adapter, [torch.tensor([1.0, 1, 0, 0]), torch.ones(4)], [torch.ones(f) for f in adapter.num_filters()])
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_attention_heads_per_layer"] = [4, 4]
    config["num_key_value_heads_per_layer"] = [2, 2]
    config["intermediate_size_per_layer"] = [48, 40]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="do not match its config"):
        load_causal_lm(tmp_path)


def test_calibration_windows_and_perplexity(tmp_path):
    import math

    from compress.data import calib
    from compress.data import perplexity

    text = "= A =\nthe king of the north\n\n= B =\nthe queen of the south\n\n= C =\nold city\n"
    docs = calib.split_documents(text)
    assert [d.splitlines()[0] for d in docs] == ["= A =", "= B =", "= C ="]
    head, tail = calib.head_and_tail(docs, 0.67)
    assert len(head) == 2 and tail == docs[2:]
    stream = torch.arange(10, 40)
    windows = calib.windows(stream, bos_id=2, num_samples=5, seq_len=8, seed=0)
    assert windows.shape == (5, 8) and (windows[:, 0] == 2).all()
    assert all(int(w[2]) == int(w[1]) + 1 for w in windows)  # running text, not shuffled tokens
    model = _model("gemma2")
    ppl_windows = perplexity.make_windows(stream % 30 + 4, 2, seq_len=8, max_windows=3)
    assert ppl_windows.shape == (3, 8) and (ppl_windows[:, 0] == 2).all()
    result = perplexity.perplexity(model, ppl_windows, batch_size=2)
    with torch.no_grad():
        logp = model(input_ids=ppl_windows).logits[:, :-1].log_softmax(-1)
    nll = -logp.gather(-1, ppl_windows[:, 1:, None]).mean()
    assert result["num_tokens"] == 21 and result["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_layerwise_tuning_equals_the_generic_tuning(kind):
    from compress.pruning.tune import tune_masks
    from compress.pruning.tune_layerwise import tune_layerwise

    model = _model(kind)
    adapter = GemmaAdapter(model)
    heads, filters = _gqa_masks(adapter)
    heads, filters = [(m != 0).float() for m in heads], [(m != 0).float() for m in filters]
    ids = _ids(4, 16)
    batches = [{"input_ids": ids[i:i + 2], "attention_mask": torch.ones_like(ids[i:i + 2])} for i in (0, 2)]
    h1, f1, r1 = tune_masks(model, adapter, batches, heads, filters, "cpu", progress=False, layerwise=False)
    h2, f2, r2 = tune_layerwise(model, adapter, batches, heads, filters, "cpu", progress=False)
    for a, b in zip(h1 + f1, h2 + f2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(a, m) for a, m in zip(h2 + f2, heads + filters))  # tuning changed something
    for e in r2:
        assert e["ffn"]["error_after"] <= e["ffn"]["error_before"] * (1 + 1e-6)


def test_perplexity_cli_on_a_saved_model(tmp_path, capsys):
    from evals import perplexity

    model, tok = _model("gemma3"), _tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text(" ".join(WORDS * 3))
    assert perplexity.main([str(tmp_path / "m"), "--text", str(tmp_path / "t.txt"), "--ppl-seq-len", "8",
                            "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_windows"] == len(WORDS) * 3 // 7 and 1.0 < result["perplexity"] < 10 * len(WORDS)


def test_sliding_window_from_either_config_style():
    from types import SimpleNamespace

    from compress.arch.gemma import sliding_window

    explicit = SimpleNamespace(sliding_window=512, layer_types=["sliding_attention", "full_attention"], model_type="gemma3_text")
    pattern = SimpleNamespace(sliding_window=512, sliding_window_pattern=6, model_type="gemma3_text")
    gemma2_old = SimpleNamespace(sliding_window=4096, model_type="gemma2")
    assert [sliding_window(explicit, i) for i in range(2)] == [512, None]
    assert [sliding_window(pattern, i) for i in range(6)] == [512] * 5 + [None]
    assert [sliding_window(gemma2_old, i) for i in range(2)] == [4096, None]


@pytest.mark.parametrize("method", ["magnitude", "activation", "activation-mlp", "fisher-mlp"])
def test_baselines_meet_the_budget_with_gqa_shapes(method, tmp_path):
    from compress.pruning.config import PruneConfig
    from compress.pruning.pipeline import Pipeline

    model, tok = _model("gemma2"), _tokenizer()
    model.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    (tmp_path / "c.txt").write_text(" ".join(WORDS * 20))
    config = PruneConfig(model=str(tmp_path / "dense"), output="-", flops=0.7, method=method, num_samples=4,
                         seq_len=16, context_len=32, calib=str(tmp_path / "c.txt"), tune=False, device="cpu")
    pipe = Pipeline(config, progress=False)
    pipe.prune()
    record = pipe.record
    assert record["flops_after"] <= 0.7 * record["flops_before"] * (1 + 1e-9)
    heads, kv = record["num_attention_heads_per_layer"], record["num_key_value_heads_per_layer"]
    assert all(h == k == 0 or h % k == 0 for h, k in zip(heads, kv))
    if method.endswith("-mlp"):
        assert heads == [4, 4]


def test_no_local_text_calibrates_on_model_samples(monkeypatch):
    from compress.data import calib

    monkeypatch.delenv("COMPRESS_DATA_DIR", raising=False)
    result = calib.resolve_calibration(_model("gemma3"), _tokenizer(), None, None, num_samples=3, seq_len=10, seed=0)
    assert result.input_ids.shape == (3, 10) and (result.input_ids[:, 0] == 2).all()
    assert "sampled from the dense model" in result.source


@pytest.mark.parametrize("method", ["fisher-group", "fisher"])
def test_a_checkpoint_with_a_zero_head_layer_prunes_again(method, tmp_path):
    """A slimmed model whose first layer kept no heads (0 query and 0 KV heads) is itself prunable: that
    layer has nothing to choose among its heads, the others are searched as usual."""
    from compress.models import checkpoint
    from compress.pruning.config import PruneConfig
    from compress.pruning.pipeline import Pipeline
    from compress.pruning.slim import slim_model

    model, tok = _model("gemma3"), _tokenizer()
    adapter = GemmaAdapter(model)
    slim_model(adapter, [torch.zeros(4), torch.ones(4)], [torch.ones(f) for f in adapter.num_filters()])
    checkpoint.save(model, tok, tmp_path / "slimmed", {})
    text = tmp_path / "calib.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (600,), generator=g)))
    config = PruneConfig(model=str(tmp_path / "slimmed"), output=str(tmp_path / "again"), flops=0.7,
                         calib=str(text), num_samples=8, seq_len=16, context_len=32, batch_size=4, device="cpu",
                         method=method)
    pipe = Pipeline(config, progress=False)
    pruned, _ = pipe.prune()
    pipe.save(pruned, tok)
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["num_attention_heads_per_layer"][0] == 0 and saved["num_key_value_heads_per_layer"][0] == 0
    assert pipe.record["flops_after"] <= 0.7 * pipe.record["flops_before"] * (1 + 1e-9)
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=_ids()).logits, load_causal_lm(tmp_path / "again")(input_ids=_ids()).logits)
