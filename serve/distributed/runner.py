"""Rank 0's model runner under tensor parallelism (`EngineConfig.tensor_parallel_size > 1`).

The engine, scheduler, block manager and sampler run once, here; each step this runner packs the batch
(serve/model_runner.pack_batch), sends it with the step's copy-on-write copies to every worker, and runs
its own shard (serve/distributed/shard.py) beside them; the logits come back gathered. The KV block plan
is made here, for rank 0's shard, which holds every KV group any rank has (serve/distributed/split.py).
The fast path (fused kernels, CUDA graphs) is not tensor-parallel yet: `fast_path="on"` is refused at
start-up, `auto` takes the eager path and says so. Any failure of a rank ends every rank and raises.
"""

from __future__ import annotations

import atexit
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from serve.config import EngineConfig
from serve.distributed import worker
from serve.distributed.shard import Shard
from serve.distributed.split import check_split
from serve.kv_cache import check_plan, plan_blocks
from serve.model_runner import pack_batch, resolve_device, resolve_dtype
from serve.models.gemma_config import spec_from_config
from serve.models.loader import read_config
from serve.scheduler import ScheduledBatch

log = logging.getLogger("serve")
COLLECTIVE_TIMEOUT_S = 300.0      # first NCCL collectives of a large model can take a while


class TensorParallelRunner:
    decode_graphs = None        # the fast path and its decode graphs are single-GPU
    memory = None               # no start-up memory profile (serve/memory.py) across ranks yet
    num_graphs = 0

    def __init__(self, config: EngineConfig, timeout_s: float = COLLECTIVE_TIMEOUT_S):
        self.config, self.world = config, config.tensor_parallel_size
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self._check(config)
        self.error: str | None = None
        address = worker.free_address()
        self.workers = worker.spawn_workers(config, self.world, self.device, self.dtype, address, timeout_s)
        atexit.register(self.close)
        try:
            worker.init_group(self.world, 0, worker.rank_device(self.device, 0), address, timeout_s)
            self.shard = Shard(config, self.world, 0, worker.rank_device(self.device, 0), self.dtype)
            self._expect_ready()
            self._plan()
        except BaseException:
            self.close()
            raise

    def _check(self, config: EngineConfig) -> None:
        if config.fast_path == "on":
            raise ValueError("fast_path='on' does not run tensor-parallel yet (fused kernels and CUDA graphs "
                             "are single-GPU); use fast_path='auto' or 'off'")
        if self.device.type == "cuda" and self.device.index not in (None, 0):
            raise ValueError(f"tensor parallelism takes GPUs 0..N-1; --device {config.device} names one GPU")
        worker.check_world(self.world, self.device)
        check_split(spec_from_config(read_config(Path(config.model))), self.world)
        if self.device.type == "cuda":
            log.warning("tensor_parallel_size=%d: the fast path and CUDA graphs are single-GPU; "
                        "running the eager path", self.world)

    def eager_reason(self) -> str:
        return f"tensor parallel over {self.world} ranks (the fast path is single-GPU)"

    def _plan(self) -> None:
        shard = self.shard
        self.spec, self.model, self.backend = shard.spec, shard.model, shard.backend
        self.max_model_len = self.config.max_model_len or self.spec.max_position_embeddings
        self.block_plan = plan_blocks(shard.local_spec, self.config, self.max_model_len, self.dtype, self._kv_budget())
        check_plan(self.block_plan, self.config, self.max_model_len)
        self._send(self.block_plan)
        shard.allocate(self.block_plan)
        self._expect_ready()
        self.kv_caches, self.kv_stacks = shard.kv_caches, shard.kv_stacks

    def _kv_budget(self) -> int | None:
        """plan_blocks' byte budget: host RAM on the CPU; on the GPU the memory free on rank 0 after its
        weights (no worst-step profile across ranks yet: the default fraction's headroom must cover one
        step). Rank 0 holds the largest share of every layer, so its plan fits every rank."""
        from serve.memory import MemoryProfile, host_budget, kv_budget

        if self.config.num_kv_blocks is not None:
            return None
        if self.shard.device.type != "cuda":
            return host_budget(self.config)
        return kv_budget(self.config, MemoryProfile(torch.cuda.mem_get_info(self.shard.device)[0], 0))

    def _send(self, message) -> None:
        for rank, (proc, pipe) in enumerate(self.workers, start=1):
            if not proc.is_alive():
                raise self._fail(f"tensor-parallel rank {rank} died (exit code {proc.exitcode})")
            pipe.send(message)

    def _expect_ready(self) -> None:
        """Wait for every worker's report on the work just sent (checking it is alive each second); the
        first error ends every rank and is raised as ValueError: the engine cannot start."""
        for rank, (proc, pipe) in enumerate(self.workers, start=1):
            while not pipe.poll(1.0):
                if not proc.is_alive():
                    raise self._fail(f"tensor-parallel rank {rank} died (exit code {proc.exitcode})", ValueError)
            try:
                report = pipe.recv()
            except EOFError:
                raise self._fail(f"tensor-parallel rank {rank} died (exit code {proc.join(5) or proc.exitcode})",
                                 ValueError) from None
            if report is not None:
                raise self._fail(report, ValueError)

    def _fail(self, message: str, error=RuntimeError) -> Exception:
        self.error = message
        self.close()
        return error(message)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [N, vocab] (fp32) for the sequences of `batch` that sample this step, in batch order."""
        if self.error is not None:
            raise RuntimeError(f"the tensor-parallel group is down: {self.error}")
        inputs = pack_batch(batch, self.block_plan, self.config.block_size)
        self._send((inputs, batch.copies))
        try:
            return self.shard.step(inputs, batch.copies)
        except Exception as err:     # a peer died or timed out inside a collective
            dead = [f"rank {r} died (exit code {p.exitcode})" for r, (p, _) in enumerate(self.workers, 1) if not p.is_alive()]
            reason = f"tensor-parallel {', '.join(dead)}" if dead else f"tensor-parallel step failed: {err}"
            raise self._fail(reason) from err

    def close(self) -> None:
        """Stop every worker and leave the process group; safe to call twice."""
        for proc, pipe in self.workers:
            try:
                pipe.send(worker.STOP)
            except (OSError, ValueError):
                pass
        for proc, pipe in self.workers:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
            pipe.close()
        self.workers = []
        if dist.is_initialized():
            dist.destroy_process_group()
        atexit.unregister(self.close)
