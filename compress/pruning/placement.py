"""Where each decoder layer goes when a model is spread over the GPUs of one host (`--device-map`).

Pure arithmetic, no devices touched: per-layer bytes and device capacities in, one device per layer out.
Layers stay whole and in order (a run of consecutive layers per device), and everything that is not a layer
(embedding, tied LM head, final norm, rotary tables) sits on the first device, the main device, where
inputs enter and the loss is taken. `auto` fills each device before the next, as accelerate's `auto` does;
`balanced` gives each device a share of the bytes proportional to its capacity.

What a layer costs is its parameters plus what the Fisher pass keeps for the backward of one calibration
batch (`fisher_activation_bytes`): the pass back-propagates through every layer at once, so at the GPU
calibration scale those activations, not the weights, are most of the memory. The estimates are upper
bounds from the Hugging Face config, not measurements.
"""

from __future__ import annotations

from compress.errors import UserError

AUTO, BALANCED = "auto", "balanced"
GIB = 2 ** 30
RESERVE_BYTES = 2 * GIB  # per GPU: CUDA context, cuBLAS workspace, allocator slack
LOSS_CHUNK = 128  # positions per LM-head chunk (compress.pruning.lm_scores.LOSS_CHUNK)


def place_layers(layer_bytes: list[int], first_bytes: int, capacities: dict[str, int],
                 balanced: bool = False) -> list[str]:
    """The device of each layer: `capacities` maps devices, in order, to the bytes each may hold; `first_bytes`
    (what is not a layer) goes on the first. UserError when the layers cannot be placed."""
    devices = list(capacities)
    total, budget = first_bytes + sum(layer_bytes), sum(capacities.values())
    if total > budget:
        raise UserError(f"the model needs about {total / GIB:.1f} GiB to prune (weights and the Fisher pass's "
                        f"activations) but {_names(devices)} have {budget / GIB:.1f} GiB free: use more GPUs, "
                        "--dtype bfloat16, or a smaller --batch-size or --seq-len")
    if first_bytes > capacities[devices[0]]:
        raise UserError(f"the embedding and LM head ({first_bytes / GIB:.1f} GiB) do not fit on {devices[0]} "
                        f"({capacities[devices[0]] / GIB:.1f} GiB free)")
    shares = [total * c / budget for c in capacities.values()]
    out, d, used = [], 0, first_bytes
    for size in layer_bytes:
        while d + 1 < len(devices) and _move_on(used, size, capacities[devices[d]], shares[d] if balanced else None):
            d, used = d + 1, 0
        if used + size > capacities[devices[d]]:
            raise UserError(f"layer {len(out)} does not fit on {devices[d]} ({size / GIB:.1f} GiB, "
                            f"{(capacities[devices[d]] - used) / GIB:.1f} GiB left there): use more GPUs, "
                            "--dtype bfloat16, or a smaller --batch-size or --seq-len")
        out.append(devices[d])
        used += size
    return out


def _move_on(used: int, size: int, capacity: int, share: float | None) -> bool:
    """Whether a layer of `size` bytes goes on the next device: it does not fit here or (balanced) most of it
    would lie past this device's share."""
    return used + size > capacity or (share is not None and used > 0 and used + size / 2 > share)


def layer_runs(layer_devices: list[str]) -> dict[str, tuple[int, int]]:
    """Per device, its first and last layer (devices without a layer left out)."""
    runs: dict[str, tuple[int, int]] = {}
    for i, device in enumerate(layer_devices):
        runs[device] = (runs.get(device, (i, i))[0], i)
    return runs


def describe(layer_devices: list[str], main: str) -> str:
    """One line: the layers each device holds, and where the rest of the model is."""
    runs = ", ".join(f"{d} layers {a}-{b}" if a != b else f"{d} layer {a}"
                     for d, (a, b) in layer_runs(layer_devices).items())
    count = len(set(layer_devices) | {main})
    return f"spread over {count} device(s): {runs}; embedding, final norm and LM head on {main}"


def fisher_activation_bytes(config, batch_size: int, seq_len: int) -> int:
    """Upper bound of what one layer keeps for the Fisher pass's backward on one batch: per token, about 40
    bytes per hidden unit (bf16 autocast, fp32 norms), 12 per filter (gate, up, their product) and 8 per
    head and key position (eager attention keeps scores and probabilities)."""
    heads = config.num_attention_heads
    per_token = 40 * config.hidden_size + 12 * config.intermediate_size + 8 * heads * seq_len
    return batch_size * seq_len * per_token


def first_device_extra_bytes(config, batch_size: int) -> int:
    """The LM head's chunk of logits, their fp32 copy and its gradient, on the main device."""
    return batch_size * LOSS_CHUNK * config.vocab_size * 12


def tuning_cache_bytes(config, num_samples: int, seq_len: int) -> int:
    """The layer-wise tuning's teacher and student hidden states (fp32) for every calibration window, and the
    next layer's being made: held by whichever device runs the layer being tuned."""
    return 3 * num_samples * seq_len * config.hidden_size * 4


def _names(devices: list[str]) -> str:
    return devices[0] if len(devices) == 1 else f"{len(devices)} devices ({', '.join(devices)})"
