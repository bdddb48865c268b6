"""Engine configuration: the one dataclass every serving component reads its limits from.

`EngineConfig` holds the user-facing knobs of `compress serve` (context length, KV memory, block size,
batch limits) and validates them with `ValueError`; the CLI turns those into one-line user errors.
KV memory is either a fraction of free device memory (<= 1) or an absolute size in GB (> 1).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    model: str
    max_model_len: int | None = None        # None: the model's max_position_embeddings
    block_size: int = 16                    # tokens per KV block
    max_num_seqs: int = 64                  # sequences in the running batch at once
    max_num_batched_tokens: int = 2048      # per-step token budget (prefill chunks + decodes)
    kv_cache_memory: float | None = None    # <= 1: fraction of free memory; > 1: GB; None: default
    num_kv_blocks: int | None = None        # exact pool size (tests); overrides kv_cache_memory
    enable_prefix_caching: bool = True
    max_n: int = 16                         # largest `n` one request may ask for
    device: str = "auto"                    # "auto": cuda when available, else cpu
    dtype: str = "auto"                     # "auto": bfloat16 on cuda, float32 on cpu
    attention_backend: str = "auto"         # "auto" | "reference" | "triton"
    fast_path: str = "auto"                 # fused projections/norms/rope + bucketed decode; auto: on cuda
    enforce_eager: bool = False             # True: never capture CUDA graphs (decode runs eagerly)
    max_graph_batch: int | None = None      # largest decode batch captured (default: max_num_seqs)
    overlap: bool = True                    # fast path: launch decode step N+1 before reading N's tokens
    seed: int = 0
    tensor_parallel_size: int = 1           # > 1: one process per GPU (serve/distributed/)

    def __post_init__(self):
        self._check_positive("block_size", "max_num_seqs", "max_num_batched_tokens", "max_n",
                             "tensor_parallel_size")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be at least 1, got {self.num_kv_blocks}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.fast_path not in ("auto", "on", "off"):
            raise ValueError(f"fast_path must be auto, on or off, got {self.fast_path!r}")
        if self.max_graph_batch is not None and self.max_graph_batch < 1:
            raise ValueError(f"max_graph_batch must be at least 1, got {self.max_graph_batch}")
        if self.attention_backend not in ("auto", "reference", "triton"):
            raise ValueError(f"attention_backend must be auto, reference or triton, got {self.attention_backend!r}")

    def _check_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def parse_memory(text: str) -> float:
    """`--kv-cache-memory` value: a fraction (0.5) or gigabytes (4, 4GB, 4G)."""
    cleaned = text.strip().upper().removesuffix("B").removesuffix("G")
    try:
        value = float(cleaned)
    except ValueError:
        raise ValueError(f"--kv-cache-memory must be a fraction like 0.5 or a size like 4GB, got {text!r}")
    if value <= 0:
        raise ValueError(f"--kv-cache-memory must be positive, got {text!r}")
    return value
