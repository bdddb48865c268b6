"""YAML recipes and the resolution of a command's config dataclass from defaults, recipe and flags.

A recipe (recipes/*.yaml) maps one-to-one onto the fields of a config dataclass (compress.pruning.config
`PruneConfig`, compress.train.config `FinetuneConfig`, compress.token_pruning.config `TokenPruningConfig`);
unknown keys are an error. Precedence: dataclass defaults < recipe < command-line flags given
explicitly (argparse defaults are `None`, meaning "not given"). Each command saves its resolved config
next to its output (`prune.json`, `finetune.json`, `token_prune.json`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from compress.errors import UserError


def require_str(config, *names: str) -> None:
    for name in names:
        if not getattr(config, name):
            raise UserError(f"missing required setting {name!r} (flag --{name.replace('_', '-')} or recipe key)")


def require_positive(config, *names: str) -> None:
    """Each named setting, when set (None means "the default"), is at least 1."""
    for name in names:
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")


def load_recipe(path: str | Path | None) -> dict[str, Any]:
    """Read a YAML recipe into a dict (empty when no path)."""
    if path is None:
        return {}
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a mapping of setting: value")
    return data


def resolve(cls, recipe: dict[str, Any] | None = None, **overrides):
    """Build a `cls` config from defaults, then the recipe, then the non-None overrides."""
    known = {f.name for f in dataclasses.fields(cls)}
    values = dict(recipe or {})
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown recipe key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    values.update({k: v for k, v in overrides.items() if v is not None and k in known})
    return cls(**values).validate()
