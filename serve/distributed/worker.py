"""The process group and the worker ranks' loop.

Rank 0 is the engine's process; ranks 1..N-1 are spawned processes (`spawn_workers`), one per GPU
(NCCL) or CPU process (gloo). Host-side messages (the KV block plan, each step's packed inputs, the
order to stop) travel from rank 0 over one pipe per worker; tensors only through torch.distributed.
A pipe, not a collective, carries the wait for the next step: an idle server may wait for hours,
while a collective times out after `timeout_s`. Dead peers: a worker whose pipe closes (rank 0 is gone)
exits; rank 0 checks its workers before each step and a collective with a dead peer fails or times out.
"""

from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STOP = None


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


def check_world(world: int, device: torch.device) -> None:
    """ValueError for more ranks than this host has devices for."""
    have = torch.cuda.device_count() if device.type == "cuda" else os.cpu_count() or 1
    kind = "GPUs" if device.type == "cuda" else "CPU cores"
    if world > have:
        raise ValueError(f"tensor_parallel_size={world} is larger than the {have} {kind} of this host")


def init_group(world: int, rank: int, device: torch.device, address: str, timeout_s: float) -> None:
    if dist.is_initialized():
        raise ValueError("a torch.distributed process group is already running in this process "
                         "(one tensor-parallel engine per process)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=address, rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s))


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def spawn_workers(config, world: int, device: torch.device, dtype, address: str, timeout_s: float):
    """[(process, pipe)] for ranks 1..world-1, started."""
    ctx = mp.get_context("spawn")
    workers = []
    for rank in range(1, world):
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=worker_main, args=(config, world, rank, device, dtype, address, timeout_s, theirs),
                           name=f"tp-rank-{rank}", daemon=True)
        proc.start()
        theirs.close()
        workers.append((proc, ours))
    return workers


def worker_main(config, world, rank, device, dtype, address, timeout_s, pipe) -> None:
    from serve.distributed.shard import Shard
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = rank_device(device, rank)
    try:
        init_group(world, rank, device, address, timeout_s)
        shard = _reply(pipe, lambda: Shard(config, world, rank, device, dtype))
        _reply(pipe, lambda: shard.allocate(pipe.recv()))
        while (message := pipe.recv()) is not STOP:
            shard.step(*message)
    except (EOFError, OSError):
        pass                                # rank 0 is gone: nothing left to serve
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _reply(pipe, work):
    """Run `work` and send rank 0 None, or the error's message and end this rank (rank 0 reports it)."""
    try:
        result = work()
    except Exception as err:
        pipe.send(f"rank {dist.get_rank()}: {type(err).__name__}: {err}")
        os._exit(1)
    pipe.send(None)
    return result
