"""Hugging Face call conventions that changed inside the transformers versions compress supports (5.17 on).

transformers 5.25 renamed the KV-cache argument of every attention forward from `past_key_values` to
`cache` (the old name still works, with a FutureWarning). Modules of ours that stand in for a Hugging
Face attention (GemmaEmptyAttention, the fused-QKV BERT/RoBERTa attention) take the cache in `**kwargs`
under either name and pass it on under the name the caller used.
"""

from __future__ import annotations

CACHE_ARGS = ("cache", "past_key_values")


def kv_cache(kwargs: dict):
    """The KV cache an attention forward was called with, under either name, or None."""
    return next((kwargs[name] for name in CACHE_ARGS if kwargs.get(name) is not None), None)


def without_cache(kwargs: dict) -> dict:
    """`kwargs` less the cache arguments (for the attention interface of a forward that has no cache)."""
    return {key: value for key, value in kwargs.items() if key not in CACHE_ARGS}
