"""Tensor parallelism over the GPUs of one host (NCCL; gloo on CPU for tests): `tensor_parallel_size=N`.

split.py: which heads, KV heads, filters and vocabulary rows each rank holds (pure functions).
layers.py: row-parallel and vocabulary-parallel modules, and the slice of each checkpoint tensor.
shard.py: one rank's model, KV cache and step. worker.py: the process group and the worker loop.
runner.py: rank 0's runner, which the engine uses in place of serve/model_runner.ModelRunner.
"""
