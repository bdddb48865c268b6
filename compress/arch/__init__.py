"""Architecture adapters: the only code that knows where heads and filters live in a model.

`get_adapter(model)` picks the adapter from `model.config.model_type`. To add an architecture,
subclass `compress.arch.base.Adapter` (see its docstring for the mask and shape conventions) and
register it in `ADAPTERS`.
"""

from __future__ import annotations

from compress.errors import UserError

ADAPTERS = {
    "bert": ("compress.arch.bert", "BertAdapter"),
    "roberta": ("compress.arch.bert", "BertAdapter"),
    "distilbert": ("compress.arch.bert", "DistilBertAdapter"),
    "mpnet": ("compress.arch.bert", "MPNetAdapter"),
    "gemma2": ("compress.arch.gemma", "GemmaAdapter"),
    "gemma3_text": ("compress.arch.gemma", "GemmaAdapter"),
    "gemma3": ("compress.arch.gemma", "GemmaAdapter"),
}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter(model):
    """The adapter for `model`; a UserError for architectures the pruner does not know."""
    import importlib

    model_type = getattr(model.config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UserError(f"model type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}")
    module, name = ADAPTERS[model_type]
    return getattr(importlib.import_module(module), name)(model)
