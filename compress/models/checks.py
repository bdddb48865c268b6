"""Checks that a model directory keeps the checkpoint contract, before anything loads it.

config.json parses and its per-layer lists (`*_per_layer`, `layer_types`) have one entry per layer;
every safetensors file is whole (a readable header, every tensor inside the file); the weights hold
as many layers as the config says, and their query, key and FFN-input projections have the rows the
config implies (heads x head_dim, KV heads x head_dim, filters); the tokenizer's files are there.
`compress serve`, `eval` and `prune` call it before they load, so a broken directory is one line and
exit 2, never a traceback or a model that quietly answers nothing (a tokenizer loaded without its
files turns every prompt into one unknown token). `CheckpointError` is a `UserError` for the CLI and
a `ValueError` for the runtime's API (serve/).

No model is built here: module paths appear only as name patterns of safetensors keys (Gemma `q_proj`,
BERT `query`, DistilBERT `q_lin`, MPNet `attn.q`); a key no pattern knows is not checked.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from compress.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")
_ROWS = {"query": re.compile(r"\.(q_proj|query|q_lin|attn\.q)\.weight$"),
         "key": re.compile(r"\.(k_proj|key|k_lin|attn\.k)\.weight$"),
         "ffn": re.compile(r"\.(gate_proj|up_proj|intermediate\.dense|lin1)\.weight$")}
_ROLE_ROWS = {"query": "query heads x head_dim", "key": "KV heads x head_dim", "ffn": "FFN filters"}
_NOT_TEXT = ("vision", "multi_modal_projector")     # a multimodal checkpoint's other towers
_ALIASES = {"layers": ("num_hidden_layers", "n_layers"), "heads": ("num_attention_heads", "n_heads"),
            "hidden": ("hidden_size", "dim"), "filters": ("intermediate_size", "hidden_dim")}


class CheckpointError(UserError, ValueError):
    """A model directory that breaks the checkpoint contract: one line, exit 2."""


def check_checkpoint(path: str | os.PathLike, tokenizer: bool = False) -> None:
    """Config, weights (and with `tokenizer`, the tokenizer's files) of the directory, or CheckpointError."""
    path = Path(path)
    config = check_config(path)
    shapes = {}
    for file in weight_files(path):
        shapes.update(read_safetensors_shapes(file))
    _check_layers(config, shapes, path)
    if tokenizer:
        check_tokenizer_files(path)


def check_tokenizer_files(path: str | os.PathLike) -> None:
    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES[:4])})")


def check_config(path: str | os.PathLike) -> dict:
    """The text model's config.json as a dict, its per-layer lists checked against num_hidden_layers."""
    file = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise CheckpointError(f"{path} is not a model directory")
    if not file.is_file():
        raise CheckpointError(f"{path} has no config.json")
    try:
        config = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON ({str(err)[:80]})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} is not a JSON object")
    config = {**config, **config["text_config"]} if isinstance(config.get("text_config"), dict) else config
    layers = _get(config, "layers")
    if layers is None:
        return config
    if not isinstance(layers, int) or layers < 1:
        raise CheckpointError(f"{file}: num_hidden_layers must be a positive integer, got {layers!r}")
    for key, value in config.items():
        if (key.endswith("_per_layer") or key == "layer_types") and value is not None:
            if not isinstance(value, list) or len(value) != layers:
                count = len(value) if isinstance(value, list) else "no list of"
                raise CheckpointError(f"{file}: {key} has {count} entries for num_hidden_layers={layers}")
    return config


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file() and not (path / "model.safetensors").is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index} is corrupt ({err})") from None
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {path} is partial: missing {', '.join(missing[:3])}")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no model.safetensors in {path} (nor any *.safetensors weights)")
    return files


def read_safetensors_shapes(file: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from the header, after checking that every tensor lies inside the file."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else 0
        if size == 0 or length < 2 or 8 + length > size:
            _corrupt(file, "empty" if size == 0 else f"truncated or not safetensors: {size:,} bytes")
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict):
        _corrupt(file, "unreadable header")
    header.pop("__metadata__", None)
    shapes, end = {}, 0
    for name, info in header.items():
        try:
            shape, (begin, stop) = [int(d) for d in info["shape"]], info["data_offsets"]
            nbytes = math.prod(shape) * _DTYPE_BYTES.get(info["dtype"], stop - begin)
        except (KeyError, TypeError, ValueError):
            _corrupt(file, f"unreadable header entry for {name}")
        if stop - begin != nbytes and info["dtype"] in _DTYPE_BYTES:
            _corrupt(file, f"{name} takes {stop - begin:,} bytes, its shape {shape} needs {nbytes:,}")
        shapes[name], end = shape, max(end, stop)
    if 8 + length + end > size:
        _corrupt(file, f"truncated: its tensors end at byte {8 + length + end:,}, the file has {size:,}")
    return shapes


def _corrupt(file: Path, why: str):
    raise CheckpointError(f"checkpoint {file} is corrupt or incomplete ({why})")


def _get(config: dict, name: str):
    return next((config[k] for k in _ALIASES[name] if config.get(k) is not None), None)


def _check_layers(config: dict, shapes: dict[str, list[int]], path: Path) -> None:
    layers = _get(config, "layers")
    text = {name: shape for name, shape in shapes.items() if not any(s in name for s in _NOT_TEXT)}
    found = {int(m.group(1)) for m in map(_LAYER.search, text) if m}
    if layers is None or not found:
        return
    if found != set(range(layers)):
        raise CheckpointError(f"config.json in {path} says {layers} layers, the weights hold {len(found)} "
                              f"(numbered {min(found)} to {max(found)})")
    rows = _expected_rows(config, layers)
    for name, shape in text.items():
        match, role = _LAYER.search(name), next((r for r, p in _ROWS.items() if p.search(name)), None)
        if match is None or role not in rows or not shape:
            continue
        want = rows[role][int(match.group(1))]
        if shape[0] != want:
            raise CheckpointError(f"weights in {path} do not match its config.json: {name} has shape {tuple(shape)}, "
                                  f"the config implies {want} rows ({_ROLE_ROWS[role]})")


def _expected_rows(config: dict, layers: int) -> dict[str, list[int]]:
    """Rows per layer of the query, key and FFN-input projections, as far as the config tells."""
    def per_layer(key: str, scalar):
        values = config.get(f"{key}_per_layer")
        return [int(v) for v in values] if values is not None else None if scalar is None else [int(scalar)] * layers

    heads, hidden = _get(config, "heads"), _get(config, "hidden")
    head_dim = config.get("head_dim") or (hidden // heads if heads and hidden else None)
    q = per_layer("num_attention_heads", heads)
    kv = per_layer("num_key_value_heads", config.get("num_key_value_heads")) or q
    for i, (hq, hkv) in enumerate(zip(q or [], kv or [])):
        if (hq == 0) != (hkv == 0) or (hkv and hq % hkv):
            raise CheckpointError(f"config.json: layer {i}'s {hq} query heads cannot share {hkv} KV heads")
    rows = {"ffn": per_layer("intermediate_size", _get(config, "filters"))}
    if head_dim:
        rows.update(query=q and [h * head_dim for h in q], key=kv and [h * head_dim for h in kv])
    return {role: r for role, r in rows.items() if r}
