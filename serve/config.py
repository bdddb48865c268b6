"""Engine configuration: the one dataclass every serving component reads its limits from.

`EngineConfig` holds the user-facing knobs of `compress serve` (context length, KV memory, block size,
batch limits) and validates them with `ValueError`; the CLI turns those into one-line user errors.
KV memory is a fraction of the device memory free after the weights (`kv_cache_memory`, <= 1; on the
GPU the KV cache, one step's activations and the decode graphs share it: serve/memory.py) or an exact
size of the KV cache in bytes (`kv_cache_bytes`); `parse_kv_cache_memory` reads the flag into either.
With a `draft`, each step the draft proposes up to `num_speculative_tokens` tokens per decoding sequence
(at most MAX_SPECULATIVE_TOKENS; "auto": chosen every step for goodput, serve/speculative/goodput.py).
Speculative steps of up to `max_spec_graph_batch` sequences replay CUDA graphs for their draft and verify
passes (on the fast path); past it speculation seldom pays (`auto` picks 0 at large batches), so more
graphs would cost start-up time and memory for steps that do not draft.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_SPECULATIVE_TOKENS = 8      # past this, verify steps grow faster than acceptance pays for them
SPEC_GRAPH_BATCH = 8            # default max_spec_graph_batch


@dataclass
class EngineConfig:
    model: str
    max_model_len: int | None = None        # None: the model's max_position_embeddings
    block_size: int = 16                    # tokens per KV block
    max_num_seqs: int = 64                  # sequences in the running batch at once
    max_num_batched_tokens: int = 2048      # per-step token budget (prefill chunks + decodes)
    kv_cache_memory: float | None = None    # fraction (0, 1] of the memory free after the weights; None: default
    kv_cache_bytes: int | None = None       # exact KV cache size in bytes; overrides kv_cache_memory
    num_kv_blocks: int | None = None        # exact pool size (tests); overrides both
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
    draft: str | None = None                # a draft model directory: speculative decoding (serve/speculative/)
    num_speculative_tokens: int | str = "auto"   # tokens the draft proposes per step, 0..MAX_SPECULATIVE_TOKENS or "auto"
    max_spec_graph_batch: int = SPEC_GRAPH_BATCH  # largest speculative step on CUDA graphs (0: eager passes)

    def __post_init__(self):
        self._check_positive("block_size", "max_num_seqs", "max_num_batched_tokens", "max_n",
                             "tensor_parallel_size")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.kv_cache_memory is not None and not 0 < self.kv_cache_memory <= 1:
            raise ValueError(f"kv_cache_memory is a fraction in (0, 1], got {self.kv_cache_memory} "
                             f"(give a size in bytes as kv_cache_bytes)")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be at least 1, got {self.num_kv_blocks}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.fast_path not in ("auto", "on", "off"):
            raise ValueError(f"fast_path must be auto, on or off, got {self.fast_path!r}")
        if self.max_graph_batch is not None and self.max_graph_batch < 1:
            raise ValueError(f"max_graph_batch must be at least 1, got {self.max_graph_batch}")
        self._check_speculation()
        if self.attention_backend not in ("auto", "reference", "triton"):
            raise ValueError(f"attention_backend must be auto, reference or triton, got {self.attention_backend!r}")

    def _check_speculation(self) -> None:
        k = self.num_speculative_tokens
        if k != "auto" and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_SPECULATIVE_TOKENS):
            raise ValueError(f"num_speculative_tokens must be 'auto' or an integer in 0..{MAX_SPECULATIVE_TOKENS}, "
                             f"got {k!r}")
        if isinstance(self.max_spec_graph_batch, bool) or not isinstance(self.max_spec_graph_batch, int) \
                or self.max_spec_graph_batch < 0:
            raise ValueError(f"max_spec_graph_batch must be an integer >= 0, got {self.max_spec_graph_batch!r}")
        if self.draft is not None and self.tensor_parallel_size > 1:
            raise ValueError("speculative decoding (a draft model) runs on one device; drop --tensor-parallel-size")

    def _check_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def max_draft_tokens(self) -> int:
        """The most tokens a step may draft per sequence."""
        k = self.num_speculative_tokens
        return MAX_SPECULATIVE_TOKENS if k == "auto" else k

    @property
    def spec_graph_batch(self) -> int:
        """Largest speculative step whose passes replay graphs (0: none, e.g. no draft or k = 0)."""
        if self.draft is None or self.max_draft_tokens == 0:
            return 0
        return min(self.max_spec_graph_batch, self.max_num_seqs)


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_kv_cache_memory(text: str) -> dict:
    """`--kv-cache-memory` as EngineConfig fields: a bare number in (0, 1] is a fraction of free memory
    ({"kv_cache_memory": 0.5}); a number with a unit is bytes ({"kv_cache_bytes": ...}): 4GB = 4e9,
    4GiB = 4G = 4 * 2**30, 512MB, 512MiB. A bare number above 1 is refused: bytes or GB was never clear."""
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGTIB")
    unit = cleaned[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if value != value or (unit and unit not in _UNITS) or value <= 0:
        raise ValueError(f"--kv-cache-memory must be a fraction like 0.9 or a size like 4GB, 4GiB or 512MB, "
                         f"got {text!r}")
    if unit:
        return {"kv_cache_bytes": int(value * _UNITS[unit])}
    if value > 1:
        raise ValueError(f"--kv-cache-memory {text} is neither a fraction (at most 1) nor a size: "
                         f"give the unit, e.g. {text}GB or {text}GiB")
    return {"kv_cache_memory": value}
