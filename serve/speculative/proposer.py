"""The draft model: its runner, the checks that it can draft for the target, and its memory share.

The draft runs through the same ModelRunner as the target; its KV groups live in the target's block
manager under ("draft", window) keys (serve/block_manager.py): allocated only when the lazy draft
catches up, prefix-cached as far as the draft has computed, preempted and freed with its sequence's. Memory: the KV budget (serve/memory.py) is split between
the two models in proportion to their KV bytes per token; on the GPU the draft's weights come out of
the draft's share first, then its CUDA graphs (DraftRunner).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors import safe_open

from serve.block_manager import draft_key
from serve.config import EngineConfig
from serve.kv_cache import KVCacheTooSmall
from serve.cuda_graphs import DecodeGraphs
from serve.memory import MemoryProfile, gib, profile
from serve.model_runner import SPEC_REMEDY, ModelRunner
from serve.models.gemma_config import spec_from_config
from serve.models.loader import read_config


class DraftRunner(ModelRunner):
    """A ModelRunner over the draft's groups. Its KV budget is given, not profiled; on the fast path its
    decode graphs serve the draft passes of speculative steps of up to `graph_batch` sequences: query
    length 1 (passes 2..k, and the catch-up over a lag of 1) and 2 (a catch-up over a lag of 2, after a
    step that kept every draft). On CUDA their memory is measured first and comes out of that budget."""

    table_key = staticmethod(draft_key)

    def __init__(self, config: EngineConfig, graph_batch: int):
        self.graph_batch = graph_batch
        super().__init__(config)

    def _graph_batch(self) -> int:
        return self.graph_batch

    def build_graphs(self, use_graphs: bool) -> tuple[DecodeGraphs | None, None]:
        if not self.graph_batch:
            return None, None
        return DecodeGraphs(self, self.graph_batch, use_graphs, (1, 2), name="draft", remedy=SPEC_REMEDY), None

    def _profile(self, use_graphs: bool) -> MemoryProfile | None:
        if self.device.type != "cuda" or self.config.num_kv_blocks is not None or not use_graphs:
            return None
        return profile(self, use_graphs=bool(self.graph_batch), step=False)

    def _kv_budget(self) -> int | None:
        budget = super()._kv_budget()
        if budget is None or self.memory is None:
            return budget
        self.kv_budget_bytes = budget - self.memory.graph_bytes
        if self.kv_budget_bytes < 1:
            raise ValueError(f"the draft's CUDA graphs ({gib(self.memory.graph_bytes)}) leave its KV cache no "
                             f"memory; {SPEC_REMEDY}")
        return self.kv_budget_bytes

    @property
    def table_plan(self) -> dict:
        """The draft's blocks per group, under the block manager's keys."""
        return {draft_key(key): n for key, n in self.block_plan.items()}


def kv_bytes_per_token(path: str) -> int:
    spec = spec_from_config(read_config(Path(path)))
    return 2 * sum(spec.num_key_value_heads) * spec.head_dim


def weight_bytes(path: str, dtype: torch.dtype) -> int:
    """Bytes of the checkpoint's tensors in `dtype` (read from the safetensors headers only)."""
    numel = 0
    for file in Path(path).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for name in f:
                shape = f.get_slice(name).get_shape()
                numel += int(torch.tensor(shape).prod()) if shape else 1
    return numel * torch.finfo(dtype).bits // 8


def check_draft_spec(config: EngineConfig) -> None:
    """ValueError when the draft cannot draft for the target: unreadable, or another vocabulary."""
    target = spec_from_config(read_config(Path(config.model)))
    try:
        draft = spec_from_config(read_config(Path(config.draft)))
    except ValueError as err:
        raise ValueError(f"the draft {config.draft} cannot be served: {err}") from None
    max_len = config.max_model_len or target.max_position_embeddings
    if draft.max_position_embeddings < max_len:
        raise ValueError(f"the draft's context is {draft.max_position_embeddings} tokens, max_model_len is {max_len}; "
                         f"lower --max-model-len")
    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"the draft's vocabulary has {draft.vocab_size} tokens, the target's {target.vocab_size}; "
                         f"a draft must share the target's tokenizer")


def check_tokenizers(target_tokenizer, draft_tokenizer) -> None:
    if draft_tokenizer.get_vocab() != target_tokenizer.get_vocab():
        raise ValueError("the draft's tokenizer differs from the target's (another vocabulary); a draft must "
                         "share the target's tokenizer")


def make_runners(config: EngineConfig) -> tuple[ModelRunner, DraftRunner]:
    """(target runner, draft runner), the KV budget split between them; ValueError where the draft does
    not fit beside the target."""
    check_draft_spec(config)
    target_bytes, draft_bytes = kv_bytes_per_token(config.model), kv_bytes_per_token(config.draft)
    share = target_bytes / (target_bytes + draft_bytes)
    try:
        target = ModelRunner(config, kv_share=share)
    except KVCacheTooSmall as err:
        raise ValueError(f"the draft {config.draft} does not fit beside the target (their KV caches share the "
                         f"budget): {err}") from None
    draft_config = dataclasses.replace(config, model=config.draft, draft=None, max_model_len=target.max_model_len)
    if config.num_kv_blocks is None:
        budget = target.kv_budget_bytes * (1 - share) / share
        if target.device.type == "cuda":
            budget -= weight_bytes(config.draft, target.dtype)
        if budget < 1:
            raise ValueError(f"the draft {config.draft} does not fit in memory beside the target")
        draft_config = dataclasses.replace(draft_config, kv_cache_bytes=int(budget), kv_cache_memory=None)
    try:
        draft = DraftRunner(draft_config, config.spec_graph_batch)
    except torch.OutOfMemoryError:
        raise ValueError(f"the draft {config.draft} does not fit in memory beside the target") from None
    except KVCacheTooSmall as err:
        raise ValueError(f"the draft {config.draft} does not fit beside the target: {err}") from None
    return target, draft
