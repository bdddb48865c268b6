"""How an encoder's token states become one embedding per text, as the model directory says.

A sentence-transformers directory says it in `modules.json` (Transformer -> Pooling [-> Normalize]),
`1_Pooling/config.json` (one of `pooling_mode_cls_token`, `_mean_tokens`, `_max_tokens`,
`_mean_sqrt_len_tokens`, `_lasttoken`) and `sentence_bert_config.json` (`max_seq_length`, the length
sentence-transformers truncates to). A directory without `modules.json` pools by the mean of its tokens
(`found` False, so a caller can say so). Modules with weights (Dense) are refused rather than skipped:
the embeddings would silently differ from the model's own.

`copy_files` carries these files from a parent directory into a pruned one, so the slimmed model embeds
exactly as its parent did. Shapes: hidden `[B, S, D]`, mask `[B, S]` (1 on real tokens) -> `[B, D]`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.errors import UserError

MODES = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens",
         "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens", "lasttoken": "pooling_mode_lasttoken"}
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
_TRANSFORMER, _POOLING, _NORMALIZE = (f"sentence_transformers.models.{n}" for n in ("Transformer", "Pooling",
                                                                                      "Normalize"))


@dataclass(frozen=True)
class Pooling:
    mode: str = "mean"
    normalize: bool = False
    max_seq_length: int | None = None  # sentence-transformers' truncation length, when the directory gives one
    found: bool = False  # read from the directory (False: the mean-pooling default)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`[B, S, D]`, `[B, S]` -> `[B, D]` in float32."""
        hidden, mask = hidden.float(), mask.to(hidden.device, torch.float32)
        out = _POOLERS[self.mode](hidden, mask)
        return torch.nn.functional.normalize(out, dim=-1) if self.normalize else out

    def describe(self) -> str:
        where = "from modules.json" if self.found else "the default: no sentence-transformers pooling config"
        return f"{self.mode} pooling{', normalised' if self.normalize else ''} ({where})"


def _cls(h, m):
    return h[:, 0]


def _mean(h, m):
    return (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1e-9)


def _max(h, m):
    return h.masked_fill(m[..., None] == 0, torch.finfo(h.dtype).min).max(1).values


def _mean_sqrt_len(h, m):
    return (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1e-9).sqrt()


def _last(h, m):
    last = (m.cumsum(1) == m.sum(1, keepdim=True)) & (m > 0)  # the last real token (right padding)
    return (h * (last & (last.cumsum(1) == 1))[..., None]).sum(1)


_POOLERS = {"cls": _cls, "mean": _mean, "max": _max, "mean_sqrt_len": _mean_sqrt_len, "lasttoken": _last}


def read_pooling(path: str | Path) -> Pooling:
    """The pooling of the model in `path`; mean pooling (found=False) without a modules.json."""
    path = Path(path)
    modules = _read_json(path / "modules.json")
    if modules is None:
        return Pooling()
    types = [m.get("type") for m in modules]
    unknown = [t for t in types if t not in (_TRANSFORMER, _POOLING, _NORMALIZE)]
    if unknown:
        raise UserError(f"{path}/modules.json has modules this runtime does not run: {', '.join(map(str, unknown))}")
    mode = "mean"
    if _POOLING in types:
        folder = modules[types.index(_POOLING)].get("path", "1_Pooling")
        mode = _pooling_mode(_read_json(path / folder / "config.json") or {}, path / folder)
    sbert = _read_json(path / "sentence_bert_config.json") or {}
    return Pooling(mode, _NORMALIZE in types, sbert.get("max_seq_length"), found=True)


def _pooling_mode(config: dict, where: Path) -> str:
    chosen = [mode for mode, key in MODES.items() if config.get(key)]
    if len(chosen) != 1:
        raise UserError(f"{where}/config.json must choose exactly one pooling mode of {', '.join(MODES)}; "
                        f"it chooses {chosen or 'none'}")
    return chosen[0]


def _read_json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg})") from None


def copy_files(source: str | Path, out: str | Path) -> None:
    """Copy the sentence-transformers files (modules.json, its module folders, the configs) of `source`
    into `out`; a no-op when `source` has none."""
    source, out = Path(source), Path(out)
    modules = _read_json(source / "modules.json")
    if modules is None:
        return
    for name in ST_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    for module in modules:
        folder = module.get("path") or ""
        if folder and (source / folder).is_dir():
            shutil.copytree(source / folder, out / folder, dirs_exist_ok=True)
