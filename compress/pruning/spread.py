"""A decoder spread over the GPUs of one host while it is pruned (`compress prune --device-map`).

`auto` and `balanced` place whole layers over the visible GPUs (compress.pruning.placement) within each
GPU's free memory; a JSON file maps module names to devices as accelerate writes them
(`{"model.embed_tokens": 0, "model.layers.0": 0, ..., "lm_head": 0}`). The weights load straight onto their
devices and accelerate's dispatch hooks move each placed module's inputs to its device, so the pipeline's
stages run unchanged on the spread model: masks are made on the device of the projection they scale
(`Adapter.head_devices`), per-example gradients and scores are gathered to the CPU, and the layer-wise
tuning carries the hidden states from device to device with the layers. The slimmed model is gathered to
the CPU (hooks removed) to be saved. Without `--device-map` none of this runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compress.errors import UserError
from compress.pruning import placement

SPECS = (placement.AUTO, placement.BALANCED)


def check_spec(spec: str) -> None:
    """`auto`, `balanced` or an existing JSON file (what can be checked before the model is read)."""
    if spec in SPECS:
        return
    if not str(spec).endswith(".json") or not Path(spec).is_file():
        raise UserError(f"--device-map must be auto, balanced or a JSON file of module: device, got {spec!r}")
    read_map(spec)


def read_map(path) -> dict[str, str]:
    """A JSON device map with its devices written as torch names (`0` -> `cuda:0`)."""
    try:
        raw = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"device map {path} is not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"device map {path} must be a non-empty mapping of module name: device")
    return {str(name): _device_name(device) for name, device in raw.items()}


def _device_name(device) -> str:
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        return f"cuda:{device}"
    text = str(device)
    if text == "cuda":
        return "cuda:0"
    if text == "cpu" or text.startswith("cuda:") and text[5:].isdigit():
        return text
    raise UserError(f"device map device {device!r}: give a GPU (0, 1, ... or cuda:N) or cpu (disk offload is "
                    "not supported)")


def check_present(spec: str) -> None:
    """The devices a JSON map names are here (`auto` and `balanced` take what is here)."""
    if spec not in SPECS:
        check_devices(read_map(spec).values())


def check_devices(devices) -> None:
    """Every device exists here, and `cpu` is either all of them or none (accelerate would offload the CPU part
    and stream it to the GPU on every pass, which the slimming cannot edit)."""
    devices, count = set(devices), torch.cuda.device_count()
    for device in sorted(devices - {"cpu"}):
        if int(device.split(":")[1]) >= count:
            have = f"{count} GPU(s) (cuda:0-{count - 1})" if count else "no GPU"
            raise UserError(f"--device-map names {device}, but this machine has {have}")
    if "cpu" in devices and len(devices) > 1:
        raise UserError("--device-map puts part of the model on cpu: place every module on a GPU, or all on cpu")


def load_spread(path, dtype, spec: str, config):
    """The decoder at `path` spread over devices by `spec`, eval mode, dispatch hooks on; prints the placement.
    `config` (a PruneConfig) gives the calibration sizes the placement provisions memory for."""
    from compress.arch.gemma import load_causal_lm

    device_map, layer_devices, main = plan(path, dtype, spec, config)
    print(f"compress: {placement.describe(layer_devices, main)}", flush=True)
    model = load_causal_lm(path, dtype=dtype, device_map=device_map)
    if getattr(model, "_hf_hook", None) is None:  # one device, or a slimmed checkpoint loaded on the CPU
        _dispatch(model, device_map)
    return model.eval()


def _dispatch(model, device_map: dict[str, str]) -> None:
    import logging

    from accelerate import dispatch_model

    log = logging.getLogger("accelerate.big_modeling")
    level = log.level
    log.setLevel(logging.ERROR)  # for an all-cpu map it warns of weights "offloaded to the cpu"; none are
    try:
        dispatch_model(model, device_map, force_hooks=True,  # a KV cache is not moved, as transformers does
                       skip_keys=getattr(model, "_skip_keys_device_placement", None))
    finally:
        log.setLevel(level)


def plan(path, dtype, spec: str, config) -> tuple[dict[str, str], list[str], str]:
    """(device map, device of each layer, main device) for the checkpoint at `path`, checked against the
    devices present and their free memory; no weights are read."""
    from compress.arch.gemma import GemmaAdapter

    skeleton = _skeleton(path, dtype)
    names = {id(m): n for n, m in skeleton.named_modules()}
    layers = [names[id(b)] for b in GemmaAdapter(skeleton).layer_modules()]
    layer_bytes, first_bytes, reserve = _sizes(skeleton, layers, config)
    if spec in SPECS:
        capacities = _gpu_capacities(reserve)
        balanced = spec == placement.BALANCED
        layer_devices = placement.place_layers(layer_bytes, first_bytes, capacities, balanced=balanced)
        main = next(iter(capacities))
        return _full_map(skeleton, layers, layer_devices, main), layer_devices, main
    device_map = read_map(spec)
    layer_devices, main = _check_map(skeleton, device_map, layers, names[id(skeleton.get_input_embeddings())])
    if main != "cpu":
        _check_fit(layer_devices, layer_bytes, first_bytes, main, reserve)
    return device_map, layer_devices, main


def _sizes(skeleton, layers: list[str], config) -> tuple[list[int], int, int]:
    """Bytes of each layer and of the rest of the model while pruning (compress.pruning.placement), and what
    every GPU keeps free besides."""
    from compress.arch.gemma import text_config

    text, batch, seq = text_config(skeleton.config), config.batch_size, config.seq_len
    activations = placement.fisher_activation_bytes(text, batch, seq)
    layer_bytes = [_param_bytes(skeleton.get_submodule(n).parameters()) + activations for n in layers]
    in_layers = {id(p) for n in layers for p in skeleton.get_submodule(n).parameters()}
    first_bytes = _param_bytes(p for p in skeleton.parameters() if id(p) not in in_layers)
    first_bytes += placement.first_device_extra_bytes(text, batch)
    reserve = placement.RESERVE_BYTES + placement.tuning_cache_bytes(text, config.num_samples, seq)
    return layer_bytes, first_bytes, reserve


def _skeleton(path, dtype):
    """The model built on the meta device (shapes only; a slimmed checkpoint's per-layer shapes applied)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from compress.arch.gemma import GemmaAdapter

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    GemmaAdapter(model).resize_to_config()
    return model


def _param_bytes(params) -> int:
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen:  # a tied LM head counts once
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def _gpu_capacities(reserve: int) -> dict[str, int]:
    """Free memory of every visible GPU less `reserve`, in device order."""
    count = torch.cuda.device_count()
    if not count:
        raise UserError("--device-map auto and balanced spread the model over CUDA GPUs and none is visible; "
                        "leave --device-map out to prune on one device")
    return {f"cuda:{i}": max(torch.cuda.mem_get_info(i)[0] - reserve, 0) for i in range(count)}


def _full_map(model, layers: list[str], layer_devices: list[str], main: str) -> dict[str, str]:
    """Each layer on its device, every other module on `main`: the modules that hold no layer, found by walking
    down from the root through those that do."""
    device_map, holders = dict(zip(layers, layer_devices)), {""}
    for name in layers:
        parts = name.split(".")
        holders.update(".".join(parts[:i]) for i in range(1, len(parts)))
    for name, module in model.named_modules():
        parent = name.rpartition(".")[0]
        if name and name not in holders and name not in device_map and parent in holders:
            device_map[name] = main
    return device_map


def _check_map(model, device_map: dict[str, str], layers: list[str], embed: str) -> tuple[list[str], str]:
    """The device of each layer and the main device (the input embedding's) of a user's map, after checking
    that it names modules of this model, keeps layers whole, covers every weight and names devices present."""
    from accelerate.utils import check_device_map

    modules = {n for n, _ in model.named_modules()}
    for key in device_map:
        if key not in modules:
            raise UserError(f"device map key {key!r} names no module of this model (e.g. {layers[0]!r})")
        inside = next((n for n in layers if key.startswith(n + ".")), None)
        if inside:
            raise UserError(f"device map key {key!r} splits {inside}: place whole layers")
    try:
        check_device_map(model, device_map)
    except ValueError as err:
        raise UserError(f"device map: {str(err).splitlines()[0]}") from None
    check_devices(device_map.values())
    return [_covering(device_map, n) for n in layers], _covering(device_map, embed)


def _covering(device_map: dict[str, str], name: str) -> str:
    """The device of the most specific key that is `name` or one of its ancestors."""
    keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    return device_map[max(keys, key=len)]


def _check_fit(layer_devices, layer_bytes, first_bytes, main, reserve) -> None:
    need = {main: first_bytes}
    for device, size in zip(layer_devices, layer_bytes):
        need[device] = need.get(device, 0) + size
    gib = placement.GIB
    for device, size in need.items():
        free = torch.cuda.mem_get_info(torch.device(device))[0] - reserve
        if size > free:
            raise UserError(f"the device map gives {device} about {size / gib:.1f} GiB to hold while pruning and it "
                            f"has {max(free, 0) / gib:.1f} GiB free: move layers to other GPUs, or use --dtype "
                            "bfloat16 or a smaller --batch-size or --seq-len")


def main_device(model) -> torch.device:
    """Where a (possibly spread) model's inputs enter: its input embedding's device."""
    return model.get_input_embeddings().weight.device


def layer_placement(adapter) -> dict[str, list[int]]:
    """Per device, the first and last layer it holds (for prune.json)."""
    devices = [str(adapter.layer_parts(i).ffn_out.weight.device) for i in range(adapter.num_layers)]
    return {d: list(run) for d, run in placement.layer_runs(devices).items()}


def gathered(model):
    """The model on the CPU with any dispatch hooks removed (a no-op for a model that was never spread)."""
    if getattr(model, "_hf_hook", None) is not None:
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(model, recurse=True)
    if hasattr(model, "hf_device_map"):  # else save_pretrained takes it for a model with offloaded weights
        del model.hf_device_map
    return model.cpu()
