"""Teacher and student, checked and loaded; the distillation checkpoint, always complete and resumable.

Checks, before anything is written: both are Gemma 2/3 decoders of one architecture and vocabulary (model
type, hidden size, head_dim, layers, vocabulary, the tokenizer's size and BOS), and the student is a Gemma the
pruner made or could have made from the teacher: every layer keeps at most the teacher's query heads, kv heads
and filters, in a GQA-feasible shape (compress/arch/gemma.py states the rule).

The output directory, whenever it exists, is a slimmed checkpoint that `compress.load` and `serve` read:
model.safetensors, config.json, the tokenizer, the student's prune.json (when it has one) and distill.json
(settings, progress, held-out history). While a run is unfinished it also holds `training_state.pt`
(optimizer, step, the teacher's sampled windows). Each checkpoint is written to a new directory beside it and
renamed into place (compress.models.outputs), so Ctrl-C leaves the last complete one and `--resume` goes on
from it; the finished output drops the training state.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compress.errors import UserError

STATE_FILE, RECORD_FILE, PRUNE_FILE = "training_state.pt", "distill.json", "prune.json"
SAME = ("model_type", "hidden_size", "head_dim", "num_hidden_layers", "vocab_size")


def read_gemma_config(name: str, role: str):
    """(directory, config) of a Gemma decoder; one-line UserErrors for anything else or anything unreadable."""
    from compress.arch.gemma import MODEL_TYPES
    from compress.models import checkpoint

    path = checkpoint.resolve(name)
    config = checkpoint.read_config(path)
    if config.model_type not in MODEL_TYPES:
        raise UserError(f"the {role} {name} is a {config.model_type!r} model, not a Gemma 2/3 decoder")
    return path, config


def load_model(path: Path, role: str, device, dtype=torch.float32):
    """A Gemma causal LM from `path`; one-line UserErrors for unreadable weights."""
    from compress.arch.gemma import load_causal_lm

    try:
        return load_causal_lm(path, dtype=dtype).to(device)
    except UserError:
        raise
    except Exception as err:  # transformers and safetensors raise many types for unreadable weights
        raise UserError(f"cannot load the {role} from {path}: {str(err).splitlines()[0][:160]}") from None


def check_pair(student_config, teacher_config, student_tok, teacher_tok) -> None:
    """UserError unless the student is a shape the pruner makes from the teacher, with the same vocabulary."""
    from compress.arch.gemma import layer_shapes, text_config

    s_cfg, t_cfg = text_config(student_config), text_config(teacher_config)
    for key in SAME:
        if getattr(s_cfg, key, None) != getattr(t_cfg, key, None):
            raise UserError(f"teacher and student differ in {key} ({getattr(t_cfg, key, None)} vs "
                            f"{getattr(s_cfg, key, None)}): the student must be pruned from this teacher")
    if len(student_tok) != len(teacher_tok) or student_tok.bos_token_id != teacher_tok.bos_token_id:
        raise UserError("teacher and student have different tokenizers (vocabulary size or BOS)")
    layers = zip(*layer_shapes(s_cfg), *layer_shapes(t_cfg))
    for i, (h, k, f, th, tk, tf) in enumerate(layers):
        feasible = (h == k == 0) or (k and h % k == 0 and h // k <= th // tk and k <= tk and h <= th)
        if not feasible or f > tf:
            raise UserError(f"student layer {i} ({h} heads on {k} kv heads, {f} filters) is not a shape the pruner "
                            f"makes from the teacher's ({th} heads on {tk}, {tf} filters)")


def read_progress(output: Path) -> tuple[dict | None, dict | None]:
    """(distill.json, training state) of an output directory; None where absent. UserError if unreadable."""
    record_path, state_path = output / RECORD_FILE, output / STATE_FILE
    record = state = None
    try:
        if record_path.is_file():
            record = json.loads(record_path.read_text())
        if state_path.is_file():
            state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as err:  # json, pickle and zip errors of a damaged file
        raise UserError(f"the checkpoint in {output} is unreadable ({str(err).splitlines()[0][:120]})") from None
    if state is not None and record is None:
        raise UserError(f"the checkpoint in {output} is incomplete: {STATE_FILE} without {RECORD_FILE}")
    return record, state


def save_checkpoint(output, student, tokenizer, prune_record: dict | None, record: dict, state: dict | None) -> None:
    """Write the student, its records and (unless finished) the training state into `output`, atomically."""
    from compress.models import checkpoint
    from compress.models.outputs import atomic_output_dir

    with atomic_output_dir(output, overwrite=True) as tmp:
        checkpoint.save(student, tokenizer, tmp, prune_record)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if state is not None:
            torch.save(state, tmp / STATE_FILE)


def read_prune_record(path: Path) -> dict | None:
    file = Path(path) / PRUNE_FILE
    try:
        return json.loads(file.read_text()) if file.is_file() else None
    except ValueError as err:
        raise UserError(f"{file} is corrupt ({err})") from None
