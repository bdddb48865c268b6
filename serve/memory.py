"""How many bytes the KV cache gets: on the GPU, what is left once the weights, one worst-case step and
the decode CUDA graphs fit (vLLM profiles a forward at the largest batch before it sizes its cache;
nano-vllm warms up first too). Sizing it from free memory alone left a second engine in one process
too little to capture its graphs (issue 33).

On CUDA, ModelRunner runs: weights -> `profile` over a cache of a few blocks (one step of
max_num_batched_tokens tokens in min(max_num_seqs, tokens) sequences that all sample with top-k, top-p
and logprobs: the allocator's peak; then the decode graphs, and serving a draft the verify graphs,
captured and dropped: the driver's free memory before and after) -> `kv_budget` -> the KV cache
allocated -> the graphs captured for real. A draft model's runner profiles only its own graphs, which
come out of the KV share it is given (serve/speculative/proposer.py).
`--kv-cache-memory` is a fraction (<= 1, default 0.9) of the memory free after the weights, which the
KV cache, a step's activations and the graphs share; or an exact size of the KV cache alone (4GB,
4GiB), refused at start-up when it leaves too little for the rest. On the CPU nothing is profiled: a
fraction of available RAM (default a quarter, at most 2 GiB), or the exact size.
"""

from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass

import torch

from serve.config import EngineConfig
from serve.kv_cache import allocate_caches, group_layers
from serve.sampler import sample
from serve.sampling_params import SamplingParams
from serve.scheduler import ScheduledBatch
from serve.sequence import Sequence

DEFAULT_FRACTION = 0.9
# The profile step samples as expensively as a request may: full-vocabulary sorts and the most logprobs.
PROFILE_SAMPLING = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, logprobs=20, max_tokens=1)


def gib(num_bytes: int) -> str:
    """A size for the start-up log: GiB, or MiB below one GiB."""
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


@dataclass
class MemoryProfile:
    free_bytes: int          # device memory free with the weights loaded (the profile's buffers released)
    step_bytes: int          # allocator peak of one worst-case step and its sampling, over what it started with
    graph_bytes: int = 0     # the CUDA graphs: their memory pools, buffers and executables


def kv_budget(config: EngineConfig, profile: MemoryProfile) -> int:
    """Bytes for the KV cache on a profiled device; ValueError when the settings leave it none."""
    reserved = profile.step_bytes + profile.graph_bytes
    needs = f"one step needs {gib(profile.step_bytes)} and the CUDA graphs {gib(profile.graph_bytes)}"
    if config.kv_cache_bytes is not None:
        if config.kv_cache_bytes + reserved > profile.free_bytes:
            raise ValueError(f"--kv-cache-memory {gib(config.kv_cache_bytes)} does not fit: {gib(profile.free_bytes)} "
                             f"are free after the weights, {needs}")
        return config.kv_cache_bytes
    fraction = DEFAULT_FRACTION if config.kv_cache_memory is None else config.kv_cache_memory
    budget = int(profile.free_bytes * fraction) - reserved
    if budget <= 0:
        raise ValueError(f"no memory is left for the KV cache: {fraction} of the {gib(profile.free_bytes)} free after "
                         f"the weights, and {needs}; lower --max-num-batched-tokens or --max-num-seqs")
    return budget


def host_budget(config: EngineConfig) -> int:
    """Bytes for the KV cache in host RAM (shared with everything else: modest unless told otherwise)."""
    if config.kv_cache_bytes is not None:
        return config.kv_cache_bytes
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if config.kv_cache_memory is None:
        return min(int(available * 0.25), 2 * 2**30)
    return int(available * config.kv_cache_memory)


# ---- profiling (CUDA) ---------------------------------------------------------------------------
def worst_step(config: EngineConfig, max_model_len: int, keys) -> ScheduledBatch:
    """The step that needs the most activation memory: the whole token budget, as many sequences as may
    sample, every one sampling. All sequences share one block table (the profile's KV is garbage)."""
    num_tokens = config.max_num_batched_tokens
    num_seqs = min(config.max_num_seqs, num_tokens)
    lengths = [min(num_tokens // num_seqs + (i < num_tokens % num_seqs), max_model_len - 1) for i in range(num_seqs)]
    table = list(range(math.ceil(max(lengths) / config.block_size)))
    batch = ScheduledBatch(max_num_new_tokens=max(lengths), num_sampling=num_seqs)
    for i, length in enumerate(lengths):
        seq = Sequence(f"profile-{i}", [0] * length, PROFILE_SAMPLING)
        seq.block_tables = {key: table for key in keys}
        batch.seqs.append(seq)
        batch.num_new_tokens.append(length)
        batch.sampling.append(True)
    return batch


def profile(runner, use_graphs: bool, step: bool = True) -> MemoryProfile:
    """Measure one worst-case step (unless `step` is False: a draft's, whose steps are the target's
    size or less) and, with `use_graphs`, the runner's graphs (runner.build_graphs: decode, and the
    speculative verify or draft graphs), over a cache of a few blocks freed again. Meanwhile
    runner.block_plan / kv_caches are the profile's."""
    config, device = runner.config, runner.device
    batch = worst_step(config, runner.max_model_len, group_layers(runner.spec))
    num_blocks = len(batch.seqs[0].block_tables[next(iter(group_layers(runner.spec)))])
    runner.block_plan = {key: num_blocks for key in group_layers(runner.spec)}
    runner.kv_caches, runner.kv_stacks = allocate_caches(runner.spec, runner.block_plan, config, runner.dtype, device)
    step_bytes = _profile_step(runner, batch) if step else 0
    graph_bytes = _profile_graphs(runner) if use_graphs else 0
    runner.kv_caches = runner.kv_stacks = None
    _release(device)
    return MemoryProfile(torch.cuda.mem_get_info(device)[0], step_bytes, graph_bytes)


def _profile_step(runner, batch: ScheduledBatch) -> int:
    device = runner.device
    for _ in range(2):      # the first run compiles kernels: Triton's benchmarking buffers must not count
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        logits = runner.run(batch)
        sample(logits, batch.seqs)
        del logits
        torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def _profile_graphs(runner) -> int:
    """Free memory the graphs take, captured over the profile's cache (their shapes do not depend on the
    number of blocks). A capture that fails raises GraphCaptureError here, before the KV cache."""
    _release(runner.device)
    before = torch.cuda.mem_get_info(runner.device)[0]
    graphs = [g for g in runner.build_graphs(use_graphs=True) if g is not None]
    _release(runner.device)
    used = before - torch.cuda.mem_get_info(runner.device)[0]
    for g in graphs:
        g.release()
    return used


def _release(device) -> None:
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()


def startup_report(runner) -> list[str]:
    """What start-up decided, one line each: KV blocks and the tokens they hold, memory, decode mode."""
    block_size = runner.config.block_size
    groups = ", ".join(f"{'full attention' if key is None else f'sliding window {key}'}: {n:,} blocks "
                       f"({n * block_size:,} tokens)" for key, n in runner.block_plan.items())
    kv_bytes = sum(t.numel() * t.element_size() for stacks in runner.kv_stacks.values() for t in stacks)
    lines = [f"KV cache: {groups}; {gib(kv_bytes)} in blocks of {block_size} tokens"]
    if runner.memory is not None:
        m = runner.memory
        lines.append(f"memory: {gib(m.free_bytes)} free after the weights; one step needs {gib(m.step_bytes)}, "
                     f"the CUDA graphs {gib(m.graph_bytes)}")
    reason = runner.eager_reason()
    lines.append(f"decode: eager, no CUDA graphs ({reason})" if reason else
                 f"decode: CUDA graphs captured for {runner.num_graphs} batch sizes up to "
                 f"{runner.decode_graphs.max_batch}")
    return lines
