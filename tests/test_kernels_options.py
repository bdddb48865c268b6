"""The kernels' A/B options (kernels/options.py): `set_options` validates and changes only what it names,
`using_options` restores what was there before, the decode config override reaches every batch size, and
no module of the product reads a kernel switch from the environment but KERNELS_BACKEND."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

import compress.kernels as kernels
from compress.kernels import DecodeConfig, KernelOptions, kernel_options, set_options, using_options
from compress.kernels.options import parse_decode_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"block_n": 64, "num_warps": 8, "num_stages": 3, "programs_per_sm": 0.5}


def test_the_defaults_are_auto_pdl_fused_logits_and_the_tuned_decode_configs():
    assert kernel_options() == KernelOptions(pdl=None, fused_logits=True, decode_config=None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        kernel_options().pdl = False


def test_set_options_changes_only_the_named_options():
    assert set_options(pdl=False) == KernelOptions(pdl=False)
    assert set_options(fused_logits=False, decode_config=CONFIG) == KernelOptions(False, False, DecodeConfig(**CONFIG))
    assert kernel_options().decode_config == DecodeConfig(64, 8, 3, 0.5)    # a dict becomes a DecodeConfig
    assert set_options(decode_config=None).decode_config is None
    assert set_options() == KernelOptions(pdl=False, fused_logits=False)


@pytest.mark.parametrize("changes,message", [
    (dict(pdl="1"), r"pdl must be None \(auto\), False \(off\) or True \(insist\), got '1'"),
    (dict(pdl=1), "pdl must be None"),
    (dict(fused_logits=0), "fused_logits must be True or False, got 0"),
    (dict(fused_logits=None), "fused_logits must be True or False"),
    (dict(use_pdl=True), r"unknown kernel option\(s\) \['use_pdl'\]"),
    (dict(decode_config="16,4,2,2"), "decode_config must be None, a DecodeConfig or a dict"),
    (dict(decode_config={"block_n": 16}), "decode_config needs exactly the keys"),
    (dict(decode_config={**CONFIG, "block_n": 24}), "block_n must be a power of two >= 16, got 24"),
    (dict(decode_config={**CONFIG, "block_n": 8}), "block_n must be a power of two >= 16"),
    (dict(decode_config={**CONFIG, "block_n": 32.0}), "block_n must be an int"),
    (dict(decode_config={**CONFIG, "num_warps": 3}), "num_warps must be a power of two from 1 to 32, got 3"),
    (dict(decode_config={**CONFIG, "num_stages": 0}), "num_stages must be >= 1, got 0"),
    (dict(decode_config={**CONFIG, "programs_per_sm": 0}), "programs_per_sm must be a number > 0, got 0"),
    (dict(decode_config={**CONFIG, "programs_per_sm": "2"}), "programs_per_sm must be a number > 0"),
])
def test_set_options_rejects_a_bad_value_and_changes_nothing(changes, message):
    set_options(pdl=False)
    before = kernel_options()
    with pytest.raises(ValueError, match=message):
        set_options(**changes)
    assert kernel_options() is before


def test_parse_decode_config_reads_a_benchmark_flag():
    assert parse_decode_config("16,4,2,2") == DecodeConfig(block_n=16, num_warps=4, num_stages=2, programs_per_sm=2.0)
    for text in ("16,4,2", "16,4,2,2,1", "sixteen,4,2,2", "24,4,2,2"):
        with pytest.raises(ValueError):
            parse_decode_config(text)


def test_using_options_restores_the_options_before_it_also_on_error():
    set_options(fused_logits=False)
    before = kernel_options()
    with using_options(pdl=True) as inside:
        assert kernel_options() is inside and inside == KernelOptions(pdl=True, fused_logits=False)
        with using_options(pdl=False, decode_config=CONFIG):
            assert kernel_options() == KernelOptions(False, False, DecodeConfig(**CONFIG))
        assert kernel_options() is inside
    assert kernel_options() is before
    with pytest.raises(RuntimeError, match="inside"):
        with using_options(fused_logits=True):
            raise RuntimeError("inside")
    assert kernel_options() is before
    with pytest.raises(ValueError, match="pdl must be"):
        with using_options(pdl="on"):
            pass
    assert kernel_options() is before


def test_the_decode_config_option_wins_at_every_batch_size():
    from compress.kernels import decode
    assert decode.decode_config(1) is decode.BATCH1_DECODE_CONFIG
    assert decode.decode_config(2) is decode.decode_config(32) is decode.DECODE_CONFIG
    with using_options(decode_config=CONFIG) as options:
        assert decode.decode_config(1) is decode.decode_config(32) is options.decode_config
    assert decode.decode_config(1) is decode.BATCH1_DECODE_CONFIG


def test_the_options_api_sits_beside_set_backend():
    for name in ("set_backend", "set_options", "kernel_options", "using_options", "KernelOptions", "DecodeConfig"):
        assert name in kernels.__all__ and callable(getattr(kernels, name)), name


def test_no_product_module_reads_a_kernel_switch_from_the_environment():
    """The kernel options come from set_options; KERNELS_BACKEND is the one environment setting left.
    Any KERNELS_* name in the source of kernels/, serve/ or compress/ other than it is a regression."""
    allowed = {"KERNELS_BACKEND"}
    found = {}
    for folder in ("kernels", "serve", "compress"):
        for path in sorted((REPO / folder).rglob("*.py")):
            names = set(re.findall(r"KERNELS_\w*", path.read_text())) - allowed
            if names:
                found[str(path.relative_to(REPO))] = sorted(names)
    assert found == {}
    assert "KERNELS_BACKEND" in (REPO / "kernels" / "dispatch.py").read_text()     # the scan sees the sources
