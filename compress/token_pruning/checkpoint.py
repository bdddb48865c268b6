"""Token-pruned checkpoints: a slimmed-checkpoint directory plus config.json["token_pruning"].

The directory is the team's checkpoint contract (safetensors weights, config.json with per-layer shape
keys when the parent was head/filter pruned, tokenizer files) with one more config key,
`"token_pruning": {"rule", "thresholds", "keep_ratios", "temperature"}` (see `PruningSpec`), and
`token_prune.json`, the record of how it was made. `load` returns the token-dropping model;
`compress.load` dispatches here when the key is present.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from compress.embeddings.pooling import copy_files
from compress.errors import UserError
from compress.token_pruning.model import PruningSpec, TokenPruningModel

CONFIG_KEY = "token_pruning"
RECORD = "token_prune.json"


def read_config(path: str | Path) -> dict:
    path = Path(path) / "config.json"
    if not path.is_file():
        raise UserError(f"{path.parent} is not a model directory (no config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg})") from None


def is_token_pruned(path: str | Path) -> bool:
    return CONFIG_KEY in read_config(path)


def save(model: TokenPruningModel, tokenizer, out_dir: str | Path, record: dict, source_dir: str | Path | None = None):
    """Write weights, config (with the thresholds), tokenizer, the record, and the parent's prune.json and
    sentence-transformers pooling files."""
    out_dir = Path(out_dir)
    hf = model.model
    setattr(hf.config, CONFIG_KEY, dataclasses.asdict(model.current_spec()))
    try:
        hf.save_pretrained(out_dir)
    finally:
        delattr(hf.config, CONFIG_KEY)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    (out_dir / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    parent_record = Path(source_dir) / "prune.json" if source_dir else None
    if parent_record is not None and parent_record.is_file():
        shutil.copy2(parent_record, out_dir / "prune.json")
    if source_dir is not None:
        copy_files(source_dir, out_dir)  # the parent's pooling config: embeddings pool as the parent's did


def load(path: str | Path, device=None) -> TokenPruningModel:
    """The token-dropping model saved in `path` (eval mode, `mode="drop"`)."""
    config = read_config(path)
    if CONFIG_KEY not in config:
        raise UserError(f"{path} is not a token-pruned model (config.json has no {CONFIG_KEY!r})")
    try:
        spec = PruningSpec(**config[CONFIG_KEY])
    except TypeError as err:
        raise UserError(f"{path}: malformed {CONFIG_KEY!r} in config.json ({err})") from None
    hf = load_plain(path)
    if hasattr(hf.config, CONFIG_KEY):
        delattr(hf.config, CONFIG_KEY)
    try:
        model = TokenPruningModel(hf, spec)
    except ValueError as err:
        raise UserError(f"{path}: {err}") from None
    return model.to(device).eval() if device is not None else model.eval()


def load_plain(path: str | Path):
    """The plain HF model in `path`, with its per-layer shapes (the core loader, compress.models.checkpoint)."""
    from compress.models.checkpoint import load as load_model

    return load_model(Path(path))
