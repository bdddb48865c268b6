"""Loading and saving sequence-classification encoders, including slimmed (uneven) checkpoints.

Gemma decoders are loaded by `compress.arch.gemma.load_causal_lm` (same contract, causal LM head);
`load` dispatches to it on the config's model type.

`load(DIR)` builds the Hugging Face class from config.json, resizes each layer to the per-layer
shapes the config records (`num_attention_heads_per_layer`, `intermediate_size_per_layer`; see the
checkpoint contract in the team brief) and loads the safetensors weights strictly: a checkpoint
whose weights are missing, unreadable or shaped differently from its config is a `UserError`, never
a silently re-initialised model. The result is a plain torch model: no masks, no hooks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from compress.models.checks import check_checkpoint, check_config, check_tokenizer_files
from compress.errors import UserError

CLASSIFIER_ARCH_SUFFIX = "ForSequenceClassification"
QA_ARCH_SUFFIX = "ForQuestionAnswering"  # span heads (compress.train.qa)


def resolve(name_or_dir: str | os.PathLike) -> Path:
    """A local model directory for a name, hub id or directory (via compress.models.hub)."""
    from compress.models.hub import resolve_model

    return Path(resolve_model(name_or_dir))


def read_config(path: Path):
    from transformers import AutoConfig

    check_config(path)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, json.JSONDecodeError, KeyError) as err:
        raise UserError(f"cannot read config.json in {path}: {str(err).splitlines()[0][:160]}") from None


def has_task_head(config) -> bool:
    return any(a.endswith((CLASSIFIER_ARCH_SUFFIX, QA_ARCH_SUFFIX)) for a in (getattr(config, "architectures", None) or []))


def load(path: str | os.PathLike, device="cpu", allow_base: bool = False):
    """A fine-tuned or slimmed model from `path` (eval mode): a task-head encoder, or a Gemma causal LM; with
    `allow_base`, an encoder without a task head loads as its bare Hugging Face model (an embedding model)."""
    from compress.arch import gemma, get_adapter

    path = resolve(path)
    check_checkpoint(path, tokenizer=True)
    config = read_config(path)
    if config.model_type in gemma.MODEL_TYPES:
        return gemma.load_causal_lm(path).to(device).eval()
    if not has_task_head(config) and not allow_base:
        raise UserError(f"model {path} has no sequence-classification head; fine-tune it first with `compress finetune`")
    state = read_weights(path)
    model = _build(config, state)  # real init: fills non-persistent buffers
    adapter = get_adapter(model)
    try:
        adapter.resize_to_config()
    except (IndexError, ValueError, RuntimeError) as err:
        raise UserError(f"config.json in {path} has inconsistent per-layer shapes ({err})") from None
    adapter.install_fast_path()
    _load_strict(model, state, path)
    return model.to(device).eval()


def _build(config, state: dict):
    """The Hugging Face model `config` describes: its task head's class, else the bare encoder (with a
    pooler only where the weights have one)."""
    from transformers import AutoModel, AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    if has_task_head(config):
        is_qa = any(a.endswith(QA_ARCH_SUFFIX) for a in config.architectures)
        return (AutoModelForQuestionAnswering if is_qa else AutoModelForSequenceClassification).from_config(config)
    pooler = {} if config.model_type == "distilbert" else {"add_pooling_layer": any(k.startswith("pooler.") for k in state)}
    return AutoModel.from_config(config, **pooler)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = _weight_files(path)
    state = {}
    for f in files:
        try:
            state.update(load_file(f))
        except Exception as err:  # safetensors raises its own error types for truncated or garbled files
            raise UserError(f"checkpoint {f} is corrupt or incomplete ({str(err).splitlines()[0][:120]})") from None
    return state


def _weight_files(path: Path) -> list[Path]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as err:
            raise UserError(f"{index} is corrupt ({err})") from None
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise UserError(f"checkpoint {path} is partial: missing {', '.join(missing)}")
        return [path / n for n in names]
    raise UserError(f"no model.safetensors in {path}")


def _load_strict(model, state: dict, path: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise UserError(f"checkpoint {path} is missing {len(missing)} weight(s), e.g. {missing[0]}")
    unexpected = [k for k in state if k not in expected and not k.endswith("position_ids")]
    if unexpected:
        raise UserError(f"checkpoint {path} has {len(unexpected)} weight(s) its config does not describe, e.g. {unexpected[0]}")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise UserError(f"weight {key} in {path} has shape {tuple(state[key].shape)}, but config.json implies "
                            f"{tuple(tensor.shape)}")
    model.load_state_dict({k: state[k] for k in expected}, strict=True)


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    check_tokenizer_files(path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the tokenizer from {path}: {str(err).splitlines()[0][:160]}") from None


def save(model, tokenizer, out_dir: Path, extra: dict | None = None, source_dir=None) -> None:
    """Write weights (safetensors), config.json, tokenizer files and, when given, prune.json; the
    sentence-transformers pooling files of `source_dir`, when it has them, so the result embeds as it did."""
    from compress.embeddings.pooling import copy_files

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if source_dir is not None:
        copy_files(source_dir, out_dir)
    if extra is not None:
        (out_dir / "prune.json").write_text(json.dumps(extra, indent=2) + "\n")
