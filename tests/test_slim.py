"""Slimming equals masking-and-scaling; save/load round-trips; uneven and empty layers work."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from compress.models import checkpoint  # noqa: E402
from compress.pruning import slim
from compress.arch import get_adapter  # noqa: E402
from compress.errors import UserError  # noqa: E402
from _tiny import KINDS, tiny_inputs, tiny_model, tiny_tokenizer  # noqa: E402


def _scaled_masks(seed=0):
    g = torch.Generator().manual_seed(seed)
    heads = [torch.tensor([1.3, 0.0, 0.7, 0.0]), torch.zeros(4)]  # layer 1 loses every head
    filters = [torch.rand(128, generator=g) * (torch.rand(128, generator=g) < 0.4), torch.zeros(128)]
    filters[1][5] = 0.9  # layer 1 keeps one filter
    return heads, filters


@pytest.mark.parametrize("kind", KINDS)
def test_slimmed_model_equals_masked_and_scaled_model(kind):
    model = tiny_model(kind)
    adapter = get_adapter(model)
    heads, filters = _scaled_masks()
    x = tiny_inputs()
    with torch.no_grad():
        with adapter.masks(heads, filters):
            ref = model(**x).logits
        slim.slim_model(adapter, heads, filters)
        out = model(**x).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert adapter.num_heads() == [2, 0]
    assert adapter.num_filters() == [int((filters[0] != 0).sum()), 1]
    assert model.config.num_attention_heads_per_layer == [2, 0]


@pytest.mark.parametrize("kind", KINDS)
def test_zero_filter_padding_keeps_outputs_and_rounds_widths(kind):
    model = tiny_model(kind)
    adapter = get_adapter(model)
    heads, filters = _scaled_masks(2)
    x = tiny_inputs()
    with torch.no_grad():
        with adapter.masks(heads, filters):
            ref = model(**x).logits
        padded = slim.slim_model(adapter, heads, filters, filter_multiple=8)
        out = model(**x).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    kept = [int((f != 0).sum()) for f in filters]
    assert adapter.num_filters() == [k + p for k, p in zip(kept, padded)]
    assert all(f % 8 == 0 for f in adapter.num_filters()) and padded[1] == 7 and max(padded) < 8


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(kind, tmp_path):
    model = tiny_model(kind)
    adapter = get_adapter(model)
    slim.slim_model(adapter, *_scaled_masks(1))
    x = tiny_inputs()
    with torch.no_grad():
        ref = model(**x).logits
    checkpoint.save(model, tiny_tokenizer(), tmp_path, {"note": "test"})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_attention_heads_per_layer"] == [2, 0]
    loaded = checkpoint.load(tmp_path)
    with torch.no_grad():
        out = loaded(**x).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in loaded.modules())


def test_uniformly_slimmed_layers_still_record_shapes(tmp_path):
    model = tiny_model("bert")
    adapter = get_adapter(model)
    half = [torch.tensor([1.0, 1.0, 0.0, 0.0])] * 2, [torch.cat([torch.ones(64), torch.zeros(64)])] * 2
    slim.slim_model(adapter, *half)
    checkpoint.save(model, tiny_tokenizer(), tmp_path)
    assert get_adapter(checkpoint.load(tmp_path)).num_heads() == [2, 2]


def test_full_masks_write_no_per_layer_keys(tmp_path):
    model = tiny_model("roberta")
    adapter = get_adapter(model)
    slim.slim_model(adapter, *adapter.ones_masks())
    checkpoint.save(model, tiny_tokenizer(), tmp_path)
    assert "num_attention_heads_per_layer" not in json.loads((tmp_path / "config.json").read_text())


def test_weights_that_mismatch_the_config_are_a_user_error(tmp_path):
    model = tiny_model("bert")
    slim.slim_model(get_adapter(model), *_scaled_masks())
    checkpoint.save(model, tiny_tokenizer(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_attention_heads_per_layer"] = [3, 0]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="shape"):
        checkpoint.load(tmp_path)


def test_truncated_weights_are_a_user_error(tmp_path):
    checkpoint.save(tiny_model("bert"), tiny_tokenizer(), tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or incomplete"):
        checkpoint.load(tmp_path)
