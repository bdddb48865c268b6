"""MPNet attention through SDPA (compress.arch.bert.MPNetSdpaSelfAttention) computes what Hugging Face's
eager attention does: dense, slimmed (sliced relative bias), padded, with and without probabilities."""

from __future__ import annotations

import copy

import pytest
import torch

from compress.arch import get_adapter
from compress.arch.bert import MPNetSdpaSelfAttention
from compress.pruning.slim import slim_model
from tests._tiny import tiny_inputs, tiny_model


@pytest.fixture(autouse=True)
def sdpa_on_cpu(monkeypatch):
    """The SDPA path runs on CUDA only by default (slower than eager on CPU); test it here."""
    monkeypatch.setattr(MPNetSdpaSelfAttention, "SDPA_DEVICES", ("cuda", "cpu"))


def _logits(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw).logits


def test_dense_mpnet_through_sdpa_equals_eager():
    eager = tiny_model("mpnet")
    fast = copy.deepcopy(eager)
    get_adapter(fast).install_fast_path()
    layers = get_adapter(fast).layer_modules()
    assert all(isinstance(blk.attention.attn, MPNetSdpaSelfAttention) for blk in layers)
    inputs = tiny_inputs(batch=4, seq=12)  # one padded row
    torch.testing.assert_close(_logits(fast, inputs), _logits(eager, inputs), rtol=1e-5, atol=1e-5)
    # the eager fallback when probabilities are asked for gives the same logits and the probabilities
    out = fast(**inputs, output_attentions=True)
    torch.testing.assert_close(out.logits, _logits(eager, inputs), rtol=1e-5, atol=1e-5)
    assert out.attentions[0].shape == (4, 4, 12, 12)


def test_sdpa_path_is_taken_on_its_devices(monkeypatch):
    fast = tiny_model("mpnet")
    get_adapter(fast).install_fast_path()
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    _logits(fast, tiny_inputs())
    assert len(calls) == 2  # one per layer
    monkeypatch.setattr(MPNetSdpaSelfAttention, "SDPA_DEVICES", ("cuda",))
    _logits(fast, tiny_inputs())
    assert len(calls) == 2  # CPU now takes the eager parent


def test_swapped_attention_keeps_eval_mode():
    """Installed on an eval-mode model (evals/encoder_latency.py does), SDPA must not apply dropout."""
    from tests._tiny import tiny_config
    from transformers import AutoModelForSequenceClassification

    config = tiny_config("mpnet")
    config.attention_probs_dropout_prob = 0.5
    torch.manual_seed(0)
    eager = AutoModelForSequenceClassification.from_config(config).eval()
    fast = copy.deepcopy(eager)
    get_adapter(fast).install_fast_path()
    slim_model(get_adapter(fast), [torch.tensor([1.0, 0, 1, 1]), torch.ones(4)], [torch.ones(128)] * 2)
    assert not any(m.training for m in fast.modules())
    inputs = tiny_inputs(batch=2, seq=8)
    torch.testing.assert_close(_logits(fast, inputs), _logits(fast, inputs))  # deterministic: no dropout
    get_adapter(eager).install_fast_path()
    fast.train(), eager.train()
    assert all(m.training for m in fast.modules()) and all(m.training for m in eager.modules())


def test_slimmed_mpnet_slices_the_bias_per_layer():
    dense = tiny_model("mpnet")
    keep_heads = [torch.tensor([0.0, 1, 0, 1]), torch.tensor([1.0, 0, 0, 0])]
    keep_filters = [torch.ones(128), torch.ones(128)]
    masked_out = _masked_logits(dense, keep_heads, tiny_inputs(batch=3, seq=9))
    slim = copy.deepcopy(dense)
    slim_model(get_adapter(slim), keep_heads, keep_filters)
    attn = [blk.attention.attn for blk in get_adapter(slim).layer_modules()]
    assert [a.head_index.tolist() for a in attn] == [[1, 3], [0]]
    torch.testing.assert_close(_logits(slim, tiny_inputs(batch=3, seq=9)), masked_out, rtol=1e-5, atol=1e-5)


def _masked_logits(model, head_masks, inputs):
    adapter = get_adapter(model)
    with torch.no_grad(), adapter.masks(head_masks, None):
        return model(**inputs).logits
