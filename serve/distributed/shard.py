"""One rank's model, KV cache and step, the same on rank 0 and on the worker ranks.

`load_shard` checks the checkpoint against config.json as the one-GPU loader does and reads only
this rank's slices (serve/distributed/layers.py); `Shard.step` runs one step's packed inputs
(serve/model_runner.HostInputs) and returns the logits of the sampled rows, gathered on every rank.
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from serve.attention import select_backend
from serve.distributed.layers import TensorParallelGemma, shard_tensor
from serve.distributed.split import shard_spec, split_model
from serve.kv_cache import allocate_caches
from serve.model_runner import HostInputs, to_device
from serve.models.gemma import GemmaForCausalLM
from serve.models.gemma_config import spec_from_config
from compress.models.checks import check_checkpoint
from serve.models.loader import _check_and_fill, _hf_name, read_config


def _meta_model(cls, *args):
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")   # pruned-away layers
        return cls(*args)


def _slices(path: Path, stack: ExitStack) -> dict:
    """HF name -> safetensors slice (read lazily) of every tensor of the checkpoint's language model."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no *.safetensors weights")
    slices = {}
    for file in files:
        try:
            handle = stack.enter_context(safe_open(str(file), framework="pt"))
            slices.update({_hf_name(n): handle.get_slice(n) for n in handle.keys() if _hf_name(n) is not None})
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"cannot read {file.name}: {err}") from None
    return slices


def load_shard(path: str | Path, world: int, rank: int, device, dtype):
    """(this rank's TensorParallelGemma, the full model's spec, this rank's spec). The checkpoint is
    checked against config.json by shape, as the one-GPU loader does; only this rank's slices are read."""
    path = Path(path)
    check_checkpoint(path, tokenizer=True)  # whole files, layer counts and shapes, tokenizer: one line
    spec = spec_from_config(read_config(path))
    shards = split_model(spec, world, rank)
    local_spec = shard_spec(spec, shards, world)
    model = _meta_model(TensorParallelGemma, local_spec, spec.vocab_size, world, rank)
    model.set_reductions(shards)
    with ExitStack() as stack:
        slices = _slices(path, stack)
        shapes = {name: torch.empty(sl.get_shape(), device="meta") for name, sl in slices.items()}
        checked = _check_and_fill(_meta_model(GemmaForCausalLM, spec), shapes)
        state = {name: shard_tensor(name, slices.get(name, checked[name]), shards, spec, world, rank)
                 .to(device=device, dtype=dtype) for name in model.state_dict()}
    model.load_state_dict(state, assign=True)
    return model.eval(), spec, local_spec


class Shard:
    def __init__(self, config, world: int, rank: int, device: torch.device, dtype: torch.dtype):
        self.config, self.device, self.dtype = config, device, dtype
        self.model, self.spec, self.local_spec = load_shard(config.model, world, rank, device, dtype)
        self.backend = select_backend(config.attention_backend, device)
        self.kv_caches, self.kv_stacks = None, None

    def allocate(self, plan: dict) -> None:
        """This rank's KV cache: the blocks of rank 0's plan, its own KV heads (groups it lacks get none)."""
        self.kv_caches, self.kv_stacks = allocate_caches(self.local_spec, plan, self.config, self.dtype, self.device)

    def copy_blocks(self, copies: list[tuple]) -> None:
        for key, src, dst in copies:
            for stack in self.kv_stacks.get(key, []):
                stack[:, :, dst] = stack[:, :, src]

    @torch.inference_mode()
    def step(self, inputs: HostInputs, copies: list[tuple]) -> torch.Tensor:
        """fp32 logits [N, vocab] of the sampled rows (every rank takes part in each collective)."""
        self.copy_blocks(copies)
        input_ids, positions, meta, rows = to_device(inputs, self.device)
        hidden = self.model(input_ids, positions, meta, self.kv_caches, self.backend)
        if not inputs.rows:
            return hidden.new_zeros(0, self.spec.vocab_size, dtype=torch.float32)
        return self.model.compute_logits(hidden[rows])
