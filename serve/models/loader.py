"""Loads a served model directory: config.json -> GemmaSpec, *.safetensors -> GemmaForCausalLM.

Accepts plain HF Gemma 2/3 text checkpoints, multimodal Gemma 3 checkpoints (only the language model
is read) and slimmed checkpoints with per-layer shape keys. Every problem a user can fix raises
ValueError with one line saying which file or tensor is wrong (compress/models/checks.py checks the
whole directory first, its tokenizer included).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from compress.models.checks import check_checkpoint
from serve.models.gemma import GemmaForCausalLM
from serve.models.gemma_config import GemmaSpec, spec_from_config

_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
             ("language_model.lm_head.", "lm_head."))
_SKIP = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} has no config.json")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from None


def _hf_name(name: str) -> str | None:
    if name.startswith(_SKIP):
        return None
    for old, new in _PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no *.safetensors weights")
    tensors = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    hf_name = _hf_name(name)
                    if hf_name is not None:
                        tensors[hf_name] = f.get_tensor(name)
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"cannot read {file.name}: {err}") from None
    return tensors


def _check_and_fill(model: GemmaForCausalLM, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    expected = {name: p.shape for name, p in model.state_dict().items()}
    if "lm_head.weight" not in expected:
        tensors.pop("lm_head.weight", None)    # tied: the embedding is the output projection
    for name, shape in expected.items():       # a 0-head layer's empty q/k/v projections need not be on disk
        if name not in tensors and shape.numel() == 0:
            tensors[name] = torch.empty(shape)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"weights lack {missing[0]} (and {len(missing) - 1} more)" if len(missing) > 1
                         else f"weights lack {missing[0]}")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise ValueError(f"{name} has shape {tuple(tensors[name].shape)}, config.json implies {tuple(shape)}")
    return {name: tensors[name] for name in expected}


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype) -> tuple[GemmaForCausalLM, GemmaSpec]:
    path = Path(path)
    spec = spec_from_config(read_config(path))
    check_checkpoint(path, tokenizer=True)     # whole files, layer counts and shapes, tokenizer: one line
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")   # pruned-away layers
        model = GemmaForCausalLM(spec)
    tensors = _check_and_fill(model, _read_tensors(path))
    tensors = {name: t.to(device=device, dtype=dtype) for name, t in tensors.items()}
    model.load_state_dict(tensors, assign=True)
    return model.eval(), spec
