"""`compress prune --device-map`: a decoder spread over devices while it is pruned.

Without GPUs, the placement arithmetic (compress.pruning.placement) is tested as the pure function it is.
"""

from __future__ import annotations

import pytest

from compress.errors import UserError
from compress.pruning.placement import describe, layer_runs, place_layers

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
