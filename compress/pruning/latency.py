"""Measured latency of encoders: timers for whole forwards and the per-layer table of `--latency-ms`.

Latency depends on shapes alone, so everything here runs random-weight models built from a config and
slimmed by the project's own adapter (`compress.pruning.slim.slim_model`, keeping the first k heads and filters
of each layer): the modules `compress prune` writes, with the fast path `compress.load` installs.

Timers. cuda: the forward is captured once in a CUDA graph and replayed, because eager MiniLM/MPNet
at batch 32 are bound by kernel launches and Python, not by the GPU work; after warm-up, `trials`
timings of `replays` back-to-back replays each (CUDA events), the median per-forward ms with min and
max. If capture fails, the eager forward is timed the same way and the timing says so. cpu: fp32,
perf_counter, median of `runs` forwards after warm-up.

The latency table (`measure_table`). A layer's latency is modelled as attention(h) + ffn(f), h kept
heads and f kept filters, plus the time of everything else (embeddings, the classifier, and the
residual add + LayerNorm that even an empty sublayer keeps). Both terms are read off whole models
timed as above, every layer of one model given the same shape, L layers:
- overhead = T(0 heads, 0 filters);
- attention(h) = (T(h, F) - T(0, F)) / L for h = 0..H, at the full width F;
- ffn(f) = (T(H, f) - T(H, 0)) / L on a grid of widths, at the full head count H.
The model is exact when the two halves of a layer do not interact; `meta["interaction_ms"]`, the
dense time measured minus the time the table predicts for it, says how far off that is. On a GPU the
grid is fine (every 64 filters, finer below 128) and the search picks among those widths only
(`exact_widths`), because cuBLAS's tile waves make time a step function of width that interpolation
would misread; on CPU, where time is close to linear in width, 9 widths and interpolation do.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

import torch

from compress.pruning.cost import LatencyTable
from compress.errors import UserError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# --- models ---------------------------------------------------------------------------------------
def dense_model(config, seed: int = 0):
    """A model of `config` with random weights, fp32, on CPU, eval mode, with the fast path `compress.load`
    installs (compress/arch/fast_path.py; MPNet: SDPA instead of Hugging Face's eager attention)."""
    from transformers import AutoModelForSequenceClassification

    from compress.arch import get_adapter

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    get_adapter(model).install_fast_path()
    return model


def slimmed_copy(dense, heads, filters, filter_multiple: int = 8):
    """A copy of `dense` slimmed to the first `heads[l]` heads and `filters[l]` filters of each layer l,
    FFN widths padded with zero filters to a multiple of `filter_multiple`, as `compress prune` does."""
    from compress.arch import get_adapter
    from compress.pruning.slim import slim_model

    model = copy.deepcopy(dense)
    adapter = get_adapter(model)
    full_heads, full_filters = adapter.num_heads(), adapter.num_filters()
    if len(heads) != len(full_heads) or len(filters) != len(full_filters):
        raise UserError(f"{len(heads)} head counts / {len(filters)} widths for a {len(full_heads)}-layer model")
    if any(k > n for k, n in zip(list(heads) + list(filters), full_heads + full_filters)):
        raise UserError(f"kept units exceed the model's: heads {heads}, filters {filters}")
    slim_model(adapter, [_first(k, n) for k, n in zip(heads, full_heads)],
               [_first(k, n) for k, n in zip(filters, full_filters)], filter_multiple=filter_multiple)
    return model


def _first(k: int, n: int) -> torch.Tensor:
    mask = torch.zeros(n)
    mask[:k] = 1.0
    return mask


def input_ids(config, batch: int, seq: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, config.vocab_size, (batch, seq), generator=g).to(device)  # above special ids


# --- timers ---------------------------------------------------------------------------------------
def _summary(times_ms: list[float], mode: str, note: str | None = None) -> dict:
    out = dict(ms=statistics.median(times_ms), min=min(times_ms), max=max(times_ms), n=len(times_ms), mode=mode)
    return out if note is None else dict(out, note=note)


@torch.inference_mode()
def time_cpu(model, batch: int, seq: int, runs: int = 7, warmup: int = 2) -> dict:
    """Median ms of `runs` fp32 forwards on CPU (perf_counter) after `warmup` untimed ones."""
    ids = input_ids(model.config, batch, seq, "cpu")
    for _ in range(warmup):
        model(input_ids=ids)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model(input_ids=ids)
        times.append((time.perf_counter() - t0) * 1000)
    return _summary(times, "eager")


@torch.inference_mode()
def time_cuda(model, batch: int, seq: int, trials: int = 20, replays: int = 20, warmup: int = 3) -> dict:
    """Median per-forward ms of CUDA-graph replays (eager if capture fails), timed with CUDA events.
    `model` must already be on the GPU, prepared by `capturable`."""
    ids = input_ids(model.config, batch, seq, "cuda")
    forward = lambda: model(input_ids=ids).logits  # noqa: E731
    graph, error = _capture(forward, warmup)
    step = graph.replay if graph is not None else forward
    for _ in range(warmup):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(trials):
        start.record()
        for _ in range(replays):
            step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return _summary(times, "cuda-graph" if graph is not None else "eager", error)


def _capture(forward, warmup: int):
    """(graph, None) with `forward` captured, or (None, reason) when capture fails."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):  # warm up on a side stream, as torch.cuda.graph asks
            for _ in range(warmup):
                forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            forward()
        return graph, None
    except Exception as err:  # a host sync or pageable copy inside the forward: time it eagerly instead
        torch.cuda.synchronize()
        return None, f"capture failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


class capturable:
    """Context in which `model`'s forward holds no host sync or pageable copy, so it can be captured:
    Hugging Face's padding warning (reads input ids on the host) off, MPNet's relative-position bias and
    the unpadded attention mask computed once per shape (some transformers versions build them from
    host tensors). Restores the module-level mask builder on exit."""

    def __init__(self, model):
        import sys

        self.model = model
        self.module = sys.modules[type(model).__module__]
        self.make_mask = getattr(self.module, "create_bidirectional_mask", None)

    def __enter__(self):
        for module in self.model.modules():
            if hasattr(module, "warn_if_padding_and_no_attention_mask"):
                module.warn_if_padding_and_no_attention_mask = lambda *args, **kwargs: None
            if hasattr(module, "compute_position_bias"):
                module.compute_position_bias = _memoized_position_bias(module.compute_position_bias)
        if self.make_mask is not None:
            self.module.create_bidirectional_mask = _memoized_mask(self.make_mask)
        return self.model

    def __exit__(self, *exc):
        if self.make_mask is not None:
            self.module.create_bidirectional_mask = self.make_mask


def _memoized_position_bias(compute):
    """MPNet's relative-position bias depends on the shape alone; some transformers versions build it
    from host tensors (a pageable copy, which capture refuses). Compute it once, in the warm-up."""
    def key(x, position_ids=None, num_buckets=32):
        return None if position_ids is not None else (tuple(x.shape[:2]), x.dtype, num_buckets)

    return _shape_memo(compute, key)


def _memoized_mask(make_mask):
    """The attention mask of an unpadded batch depends on its shape alone; eager attention (MPNet) builds
    it with a host scalar, which capture refuses. Build it once, in the warm-up."""
    def key(*args, attention_mask=None, inputs_embeds=None, **kwargs):
        if attention_mask is not None or inputs_embeds is None:
            return None
        return tuple(inputs_embeds.shape[:2]), inputs_embeds.dtype

    return _shape_memo(make_mask, key)


def _shape_memo(fn, key_of):
    """`fn` cached by `key_of(*args, **kwargs)`; a None key calls `fn` every time."""
    cache = {}

    def cached(*args, **kwargs):
        key = key_of(*args, **kwargs)
        if key is None:
            return fn(*args, **kwargs)
        if key not in cache:
            cache[key] = fn(*args, **kwargs)
        return cache[key]

    return cached


def time_model(model, device: str, batches: list[int], seq: int, dtype: str = "bfloat16", trials: int = 10,
               replays: int = 10, warmup: int = 3) -> dict:
    """{"bB": timing} of `model` at each batch size B (`time_cuda` or `time_cpu`); on cuda the model is
    moved there in `dtype` once, and back to the CPU afterwards."""
    if device == "cpu":
        return {f"b{b}": time_cpu(model, b, seq, trials, min(warmup, 2)) for b in batches}
    model.to(device="cuda", dtype=DTYPES[dtype])
    try:
        with capturable(model):
            return {f"b{b}": time_cuda(model, b, seq, trials, replays, warmup) for b in batches}
    finally:
        model.to("cpu")
        torch.cuda.empty_cache()


# --- the latency table ----------------------------------------------------------------------------
def width_grid(num_filters: int, device: str, step: int | None = None) -> list[int]:
    """FFN widths the table times: on cuda every `step` (64) filters plus 8..96 below 128, since the fused
    narrow FFN and cuBLAS both change there; on cpu 9 evenly spaced widths (interpolated)."""
    if device == "cpu" and step is None:
        return sorted({round(num_filters * k / 8) for k in range(9)})
    step = step or 64
    fine = [w for w in (8, 16, 24, 32, 48, 64, 96) if w < num_filters]
    return sorted({0, num_filters, *fine, *range(step, num_filters, step)})


def measure_table(config, batch: int, seq: int, device: str = "cpu", dtype: str = "bfloat16",
                  widths: list[int] | None = None, trials: int = 10, replays: int = 10,
                  progress: bool = True) -> LatencyTable:
    """The latency table of models shaped like `config` on `device` at [batch, seq] (module docstring)."""
    from tqdm.auto import tqdm

    from compress.arch import get_adapter

    dense = dense_model(config)
    adapter = get_adapter(dense)
    heads, filters, layers = max(adapter.num_heads()), max(adapter.num_filters()), adapter.num_layers
    if set(adapter.num_heads()) != {heads} or set(adapter.num_filters()) != {filters}:
        raise UserError("the latency table needs a model whose layers all have the same shape (a dense parent)")
    widths = sorted(set(widths or width_grid(filters, device)) | {0, filters})
    if widths[0] < 0 or widths[-1] > filters:
        raise UserError(f"table widths must lie in 0..{filters}, got {widths[0]}..{widths[-1]}")
    shapes = [(0, 0)] + [(h, filters) for h in range(heads + 1)] + [(heads, w) for w in widths]
    times = {}
    for h, f in tqdm(list(dict.fromkeys(shapes)), desc=f"latency table ({device})", unit="shape",
                     disable=not progress):
        model = dense if (h, f) == (heads, filters) else slimmed_copy(dense, [h] * layers, [f] * layers, 1)
        times[h, f] = time_model(model, device, [batch], seq, dtype, trials, replays)[f"b{batch}"]["ms"]
    # differences of noisy timings can dip below zero where a few units cost next to nothing: clamp at 0
    attention = [max(0.0, (times[h, filters] - times[0, filters]) / layers) for h in range(heads + 1)]
    ffn = [max(0.0, (times[heads, w] - times[heads, 0]) / layers) for w in widths]
    table = LatencyTable(attention, widths, ffn, overhead_ms=times[0, 0], exact_widths=device != "cpu")
    predicted = table.model_ms([heads] * layers, [filters] * layers)
    table.meta = dict(device=_device_name(device), dtype=dtype if device != "cpu" else "float32", batch=batch,
                      seq=seq, hidden=adapter.hidden_size(), heads=heads, filters=filters, layers=layers,
                      model_type=config.model_type, dense_ms=times[heads, filters],
                      interaction_ms=times[heads, filters] - predicted, trials=trials, replays=replays,
                      torch=torch.__version__)
    return table


def _device_name(device: str) -> str:
    import platform

    return torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()} cpu"


def save_table(table: LatencyTable, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(table.to_dict(), indent=1) + "\n")
    tmp.replace(path)
    return path


def load_table(path) -> LatencyTable:
    """A table written by `save_table` (`compress latency-table`); a one-line UserError if it is not one."""
    path = Path(path)
    try:
        return LatencyTable.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise UserError(f"latency table {path} not found (write one with `compress latency-table`)") from None
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise UserError(f"latency table {path} is not one `compress latency-table` writes ({err})") from None


def check_table(table: LatencyTable, adapter) -> None:
    """A table measured for another architecture would budget the wrong model: refuse it."""
    want = dict(hidden=adapter.hidden_size(), heads=max(adapter.num_heads()), filters=max(adapter.num_filters()),
                layers=adapter.num_layers)
    got = {k: table.meta.get(k) for k in want}
    if got != want:
        raise UserError(f"the latency table was measured for a model with {got}, this one has {want}")


def budget(config, adapter, seq_len: float) -> dict:
    """The latency budget in ms of `compress prune --latency-ms/--speedup` and the table it is measured by:
    the table of `--latency-table`, or one measured now on the model's device at the calibration length."""
    if config.latency_table is not None:
        table = load_table(config.latency_table)
    else:
        device = next(adapter.model.parameters()).device.type
        trials = 3 if device == "cpu" else 10  # a CPU forward at batch 32 takes seconds; a graph replay, a millisecond
        table = measure_table(adapter.model.config, config.latency_batch_size, max(1, round(seq_len)), device,
                              trials=trials)
    check_table(table, adapter)
    dense_ms = table.meta.get("dense_ms") or table.model_ms(adapter.num_heads(), adapter.num_filters())
    limit = config.latency_ms if config.latency_ms is not None else dense_ms / config.speedup
    if limit <= table.overhead_ms:
        raise UserError(f"a latency budget of {limit:.3f} ms is below the unprunable part of the model "
                        f"({table.overhead_ms:.3f} ms at batch {table.meta.get('batch')})")
    if config.keep_last_head and limit < table.overhead_ms + table.attention_ms[1]:
        raise UserError(f"a latency budget of {limit:.3f} ms leaves no room for the last layer's head "
                        f"({table.overhead_ms + table.attention_ms[1]:.3f} ms with it; --no-keep-last-head lifts that)")
    return {"budget_ms": limit, "dense_ms": dense_ms, "table": config.latency_table or "measured",
            "latency_table": table.to_dict()}
