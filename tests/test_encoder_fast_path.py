"""The encoders' fast path (compress/arch/fast_path.py: fused residual-add LayerNorm, one QKV GEMM)
computes what the unfused Hugging Face forward does, on dense and slimmed (uneven, 0-head) models,
without changing the state dict; CPU, training and autograd keep the unfused path.

The fast path runs on CUDA only; `fast_on_cpu` widens FAST_DEVICES (and MPNet's SDPA_DEVICES) so it
runs here, through both kernel backends (Triton under TRITON_INTERPRET=1, and the torch reference).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

from compress import kernels
from compress.arch import fast_path, get_adapter
from compress.arch.bert import MPNetSdpaSelfAttention
from compress.pruning.slim import slim_model
from compress.kernels import dispatch
from compress.kernels.testing import relative_error
from tests._tiny import tiny_config, tiny_inputs, tiny_model

KINDS = ("bert", "roberta", "mpnet")
# layer 0 keeps 3 of 4 heads and 58 of 128 filters, layer 1 keeps no heads and every filter
HEADS = [torch.tensor([1.0, 0, 1, 1]), torch.zeros(4)]
FILTERS = [(torch.arange(128) % 9 < 4).float(), torch.ones(128)]


@pytest.fixture
def fast_on_cpu(monkeypatch):
    """The fast path on CPU tensors, through the reference kernels unless `backend` says otherwise."""
    monkeypatch.setattr(fast_path, "FAST_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(MPNetSdpaSelfAttention, "SDPA_DEVICES", ("cuda", "cpu"))
    previous = dispatch.backend_name()
    dispatch.set_backend("reference")
    yield
    dispatch.set_backend(previous)


@pytest.fixture(params=["triton", "reference"])
def backend(request, fast_on_cpu):
    if request.param == "triton" and torch.cuda.is_available():
        pytest.skip("compiled Triton takes CUDA tensors only: the gpu tests below run it")
    dispatch.set_backend(request.param)
    return request.param


def _kernel_calls(monkeypatch, name: str) -> list:
    """A list that grows by one each time the dispatched op `kernels.<name>` runs."""
    calls = []
    op = getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *args: calls.append(1) or op(*args))
    return calls


@pytest.fixture
def norm_calls(monkeypatch):
    """How many times the fused add + LayerNorm ran."""
    return _kernel_calls(monkeypatch, "add_layer_norm")


def _logits(model, inputs=None):
    with torch.no_grad():
        return model(**(inputs or tiny_inputs(batch=3, seq=9))).logits


def _masked_logits(model, inputs=None, filters=FILTERS):
    with torch.no_grad(), get_adapter(model).masks(HEADS, filters):
        return model(**(inputs or tiny_inputs(batch=3, seq=9))).logits


def _qkv_calls(model) -> list:
    """Calls of the separate q/k/v projections (absent on the fast path), counted by wrapping their
    forward: a forward hook would itself make the fast path run them unfused (fast_path.hooked)."""
    calls, adapter = [], get_adapter(model)
    for i in range(adapter.num_layers):
        parts = adapter.layer_parts(i)
        for proj in (parts.q, parts.k, parts.v):
            if proj is not None:
                proj.forward = lambda x, _forward=proj.forward: calls.append(1) or _forward(x)
    return calls


def _installed_copy(kind: str):
    """A tiny model, a copy with the fast path installed, and the copy's separate q/k/v call counter."""
    model = tiny_model(kind)
    fast = copy.deepcopy(model)
    get_adapter(fast).install_fast_path()
    return model, fast, _qkv_calls(fast)


def _fast(model, slim_first: bool, filters=FILTERS):
    """A copy of `model` with the fast path installed and the slimming applied, in either order
    (compress.load slims, then installs; evals/encoder_latency.py installs, then slims). Installed
    first, a fused forward runs before the slimming: the QKV buffers must then follow the new weights."""
    model = copy.deepcopy(model)
    adapter = get_adapter(model)
    if slim_first:
        slim_model(adapter, HEADS, filters)
    adapter.install_fast_path()
    if not slim_first:
        _logits(model)
        slim_model(adapter, HEADS, filters)
    return model


def _counting(linear) -> list:
    """A list that grows by one each time `linear`'s forward runs."""
    calls = []
    linear.forward = lambda x, _forward=linear.forward: calls.append(1) or _forward(x)
    return calls


@pytest.mark.parametrize("kind", KINDS)
def test_dense_fast_path_equals_the_unfused_forward(kind, backend, norm_calls):
    model, fast, qkv_calls = _installed_copy(kind)
    got, want = _logits(fast), _logits(model)
    assert relative_error(got, want) < 1e-5
    assert len(norm_calls) == 4 and not qkv_calls  # two norms per layer, no separate q/k/v GEMMs
    assert all(layer.qkv_weight.shape == (192, 64) for layer in _attentions(fast))


@pytest.mark.parametrize("kind", ("bert", "roberta"))
def test_fused_and_fallback_attention_pass_the_cache_argument_as_given(kind, fast_on_cpu):
    """transformers 5.25 renamed the attention's `past_key_values` to `cache` and warns when both are set;
    the fused attention forwards whichever the caller gave, fused or not (a hooked q runs unfused)."""
    model, fast, _ = _installed_copy(kind)
    want = _logits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        fused = _logits(fast)
        get_adapter(fast).layer_parts(0).q.register_forward_hook(lambda *args: None)
        fallback = _logits(fast)
    assert relative_error(fused, want) < 1e-5 and relative_error(fallback, want) < 1e-5


def test_fused_qkv_goes_through_the_configured_attention(fast_on_cpu, norm_calls):
    """BERT's fused path hands q, k, v to the model's attention interface: eager takes a float mask."""
    model = tiny_model("bert")
    model.set_attn_implementation("eager")
    fast = copy.deepcopy(model)
    get_adapter(fast).install_fast_path()
    assert fast.config._attn_implementation == "eager"
    assert relative_error(_logits(fast), _logits(model)) < 1e-5
    assert len(norm_calls) == 4


@pytest.mark.parametrize("slim_first", [True, False], ids=["slim-then-install", "install-then-slim"])
@pytest.mark.parametrize("kind", KINDS)
def test_slimmed_fast_path_equals_the_masked_model(kind, slim_first, backend, norm_calls):
    model = tiny_model(kind)
    fast = _fast(model, slim_first)
    assert get_adapter(fast).num_heads() == [3, 0]
    got = _logits(fast)
    assert relative_error(got, _masked_logits(model)) < 1e-5
    assert [layer.qkv_weight.shape for layer in _attentions(fast)] == [(3 * 3 * 16, 64)]
    assert len(norm_calls) == 4 * (1 if slim_first else 2)  # the 0-head layer's norm is fused too


@pytest.mark.parametrize("kind", KINDS + ("distilbert",))
def test_zero_head_output_projection_is_its_broadcast_bias(kind, backend, norm_calls):
    """A 0-head layer's output projection (no inputs) is not run on the fast path: its bias, broadcast
    as a view, goes into the add + norm kernel (row stride 0), with the logits of the masked model. The
    projection runs again, hooks firing, once something hooks it (weight tuning does)."""
    model = tiny_model(kind)
    fast = _fast(model, slim_first=True)
    o = get_adapter(fast).layer_parts(1).o
    assert o.in_features == 0
    calls = _counting(o)
    assert relative_error(_logits(fast), _masked_logits(model)) < 1e-5 and not calls
    seen = []
    hook = o.register_forward_hook(lambda m, a, out: seen.append(out.stride()))
    assert relative_error(_logits(fast), _masked_logits(model)) < 1e-5
    hook.remove()
    assert calls == [1] and seen == [(9 * 64, 64, 1)]  # the Linear's own, materialised output


@pytest.mark.parametrize("kind", KINDS)
def test_zero_filter_ffn_output_is_its_broadcast_bias(kind, backend, norm_calls):
    """The same for a layer whose FFN keeps no filter: its output projection has no inputs either."""
    model, filters = tiny_model(kind), [torch.zeros(128), FILTERS[1]]
    fast = _fast(model, slim_first=True, filters=filters)
    ffn_out = get_adapter(fast).layer_parts(0).ffn_out
    assert ffn_out.in_features == 0
    calls = _counting(ffn_out)
    assert relative_error(_logits(fast), _masked_logits(model, filters=filters)) < 1e-5 and not calls
    assert len(norm_calls) == 4


@pytest.mark.parametrize("kind", KINDS)
def test_cpu_default_runs_the_unfused_ops_exactly(kind, norm_calls):
    model = tiny_model(kind)
    fast = copy.deepcopy(model)
    get_adapter(fast).install_fast_path()
    qkv_calls = _qkv_calls(fast)
    assert torch.equal(_logits(fast), _logits(model))
    assert not norm_calls and len(qkv_calls) == 6
    slim = _fast(model, slim_first=True)
    assert torch.equal(_logits(slim), _logits(_slimmed(model)))


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_and_saved_files_are_unchanged(kind, fast_on_cpu, tmp_path):
    from safetensors.torch import load_file

    model = _slimmed(tiny_model(kind))
    before = model.state_dict()
    model.save_pretrained(tmp_path / "before")
    get_adapter(model).install_fast_path()
    _logits(model)  # builds the concatenated QKV buffers
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any("qkv" in k for k in after)
    model.save_pretrained(tmp_path / "after")
    saved = [load_file(tmp_path / d / "model.safetensors") for d in ("before", "after")]
    assert sorted(saved[0]) == sorted(saved[1])


@pytest.mark.parametrize("kind", KINDS)
def test_training_and_autograd_take_the_unfused_path(kind, fast_on_cpu, norm_calls):
    _, fast, qkv_calls = _installed_copy(kind)
    fast(**tiny_inputs()).logits.sum().backward()  # eval mode, but gradients wanted
    assert not norm_calls and len(qkv_calls) == 6
    assert get_adapter(fast).layer_parts(0).q.weight.grad is not None
    fast.train()
    _logits(fast)
    assert not norm_calls


@pytest.mark.parametrize("kind", ["bert", "mpnet"])
def test_fused_qkv_follows_in_place_and_dtype_changes(kind, fast_on_cpu):
    model = tiny_model(kind)
    fast = copy.deepcopy(model)
    get_adapter(fast).install_fast_path()
    _logits(fast)
    for m in (model, fast):
        with torch.no_grad():
            get_adapter(m).layer_parts(1).k.weight.mul_(-1.5)  # in place: same tensor, new version
    assert relative_error(_logits(fast), _logits(model)) < 1e-5
    fast.double()
    assert relative_error(_logits(fast), _logits(model)) < 1e-5
    assert all(layer.qkv_weight.dtype == torch.float64 for layer in _attentions(fast))


def _slimmed(model):
    model = copy.deepcopy(model)
    slim_model(get_adapter(model), HEADS, FILTERS)
    return model


def _attentions(model) -> list:
    """The self-attention modules that hold heads (0-head layers have none)."""
    adapter = get_adapter(model)
    blocks = adapter.layer_modules()
    attention = (lambda b: b.attention.attn) if model.config.model_type == "mpnet" else (lambda b: b.attention.self)
    return [attention(b) for i, b in enumerate(blocks) if adapter.layer_parts(i).num_heads]


def test_compress_imports_and_installs_without_triton():
    """triton is an optional dependency: the fast path imports the dispatcher, never a Triton module."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None\n"
            "from compress.arch import get_adapter\nfrom tests._tiny import tiny_model\n"
            "for kind in ('bert', 'mpnet'):\n"
            "    m = tiny_model(kind); get_adapter(m).install_fast_path(); m(input_ids=m.dummy_inputs['input_ids'])\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_default_fuses_and_matches_the_unfused_forward(kind, dtype, norm_calls, ffn_calls, monkeypatch):
    """fp32: equal to the unfused forward; bf16: about as close to the fp32 forward as the unfused one,
    with both (narrow) FFN blocks as one kernel each."""
    monkeypatch.setattr(fast_path, "NARROW_FFN_MAX_FILTERS", 128)
    exact = _slimmed(tiny_model(kind)).to("cuda")
    model = copy.deepcopy(exact).to(dtype)
    fast = copy.deepcopy(model)
    get_adapter(fast).install_fast_path()
    qkv_calls = _qkv_calls(fast)
    inputs = {k: v.cuda() for k, v in tiny_inputs(batch=4, seq=16).items()}
    got, unfused, want = _logits(fast, inputs), _logits(model, inputs), _logits(exact, inputs)
    assert dispatch.backend_name() == "triton" and not qkv_calls
    assert (len(norm_calls), len(ffn_calls)) == ((4, 0) if dtype == torch.float32 else (2, 2))
    if dtype == torch.float32:
        assert relative_error(got, unfused) < 1e-4
    else:
        assert relative_error(got, want) < 2 * relative_error(unfused, want) + 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bert", "mpnet"])
def test_fast_path_is_captured_in_a_cuda_graph(kind, norm_calls):
    """evals/encoder_latency.py times the fast path as CUDA-graph replays; capture fails on a host sync."""
    import argparse

    from evals import encoder_latency as el

    model = el.slimmed_copy(el.dense_model(tiny_config(kind)), [3, 0], [57, 128])
    args = argparse.Namespace(batches=[4], seq=16, trials=1, replays=2, warmup=2, cuda_dtype="bfloat16")
    timing = el.time_shape(model, "cuda", args)["b4"]
    assert timing["mode"] == "cuda-graph", timing
    assert norm_calls  # the fused kernels ran in the warm-up before capture


@pytest.mark.parametrize("kind", ["bert", "mpnet"])
def test_hooked_modules_run_unfused_so_their_hooks_fire(kind, fast_on_cpu, norm_calls):
    """Mask tuning and activation statistics hook the q/k/v Linears and the LayerNorms: a hooked module
    is called as itself (same logits), the others stay fused."""
    fast = tiny_model(kind)
    get_adapter(fast).install_fast_path()
    want = _logits(fast)
    fused_norms = len(norm_calls)
    parts = get_adapter(fast).layer_parts(0)
    seen = []
    hooks = [m.register_forward_hook(lambda m, a, out: seen.append(m)) for m in (parts.q, parts.attn_norm)]
    got = _logits(fast)
    for h in hooks:
        h.remove()
    assert seen == [parts.q, parts.attn_norm] and relative_error(got, want) < 1e-5
    assert len(norm_calls) - fused_norms == fused_norms - 1   # only the hooked norm left the kernel


@pytest.fixture
def ffn_calls(monkeypatch):
    """How many times the fused narrow FFN block ran."""
    return _kernel_calls(monkeypatch, "ffn_add_layer_norm")


@pytest.mark.parametrize("kind", KINDS)
def test_narrow_ffn_runs_as_one_kernel_in_16_bits(kind, backend, norm_calls, ffn_calls, monkeypatch):
    """fp16, both FFNs narrow (58 -> 64 padded, 128 filters): each block is one fused call, no add + norm
    of its own, and the logits are as close to the fp32 masked model's as the unfused fp16 forward's.
    (fp16 here: the triton 3.9 interpreter truncates bf16, which the tiny model's logits amplify; the
    gpu test below runs bf16.)"""
    monkeypatch.setattr(fast_path, "NARROW_FFN_MAX_FILTERS", 128)
    model = tiny_model(kind)
    want = _masked_logits(model)
    fast = _fast(model, slim_first=True).to(torch.float16)
    unfused = _slimmed(model).to(torch.float16)
    got = _logits(fast).float()
    assert len(ffn_calls) == 2 and len(norm_calls) == 2   # the attention sublayers' norms only
    error = relative_error(got, want)
    assert error < 1.2 * relative_error(_logits(unfused).float(), want) + 2e-3
    # the fused blocks compute something: zeroing the second block's FFN2 moves the logits
    with torch.no_grad():
        get_adapter(fast).layer_parts(1).ffn_out.weight.zero_()
    assert relative_error(_logits(fast).float(), want) > 5 * error


@pytest.mark.parametrize("kind", ["bert", "mpnet"])
def test_narrow_ffn_limits_and_hooks(kind, fast_on_cpu, monkeypatch, ffn_calls):
    """Past NARROW_FFN_MAX_FILTERS, in fp32, or with a hooked FFN Linear, the block runs unfused (the hook
    fires), with the same logits as the unfused model."""
    model = _slimmed(tiny_model(kind)).to(torch.float16)
    fast = copy.deepcopy(model)
    get_adapter(fast).install_fast_path()
    want = _logits(model).float()
    from compress.kernels import ffn

    assert fast_path.NARROW_FFN_MAX_FILTERS == 64 <= ffn.MAX_FILTERS  # layer 0 (58 -> 64 filters), not layer 1
    assert relative_error(_logits(fast).float(), want) < 1e-2 and len(ffn_calls) == 1
    ffn_in = get_adapter(fast).layer_parts(0).ffn_in[0]
    seen = []
    hook = ffn_in.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    assert relative_error(_logits(fast).float(), want) < 1e-2 and len(ffn_calls) == 1 and len(seen) == 1
    hook.remove()
    assert relative_error(_logits(fast.float()), _logits(model.float())) < 1e-5 and len(ffn_calls) == 1
