"""The record of a pruning run (`prune.json`) and its end-of-run summary, for both families.

Every record holds: model, source_dir, task, calibration, num_samples, method, constraint, flops_before,
flops_after, flops_ratio (FLOPs of the kept units; decoders count the non-embedding FLOPs), the kept
heads and filters per layer, seconds per phase and the resolved settings (`recipe`). Encoders add the
cost model's seq_len, the zero padding filters and, when asked, latency and dev metrics before and
after; decoders add the cost model's context_len, the kept KV heads per layer and the LM head's FLOPs.
"""

from __future__ import annotations

CONSTRAINTS = ("flops", "latency_ms", "speedup", "drop_layers")


def shape_record(config, shape: dict, phases) -> dict:
    """The record's common part, around the family's `shape` fields (compress.pruning.encoder/decoder)."""
    constraint = {k: getattr(config, k) for k in CONSTRAINTS if getattr(config, k) is not None}
    return {"family": config.family, "method": config.method, "constraint": constraint, **shape,
            "flops_ratio": shape["flops_after"] / shape["flops_before"],
            "seconds": dict(phases.seconds, total=round(sum(phases.seconds.values()), 3)),
            "recipe": config.settings()}


def format_summary(record: dict) -> str:
    """FLOPs kept, per-layer shapes, time per phase; latency, search steps and dev metrics when present."""
    lines = [_title(record), f"  calibration: {record['calibration']} ({record['num_samples']} examples)",
             "  " + _flops_line(record)]
    if "latency" in record:
        lines.append("  " + _latency_line(record["latency"]))
    if "steps" in record:
        lines.append("  search steps: " + "; ".join(f"FLOPs {s['flops']:.3g} -> {sum(s['heads'])} heads, "
                                                    f"{sum(s['filters'])} filters" for s in record["steps"]))
    lines.append(f"  heads per layer:    {record['num_attention_heads_per_layer']}")
    if "num_key_value_heads_per_layer" in record:
        lines.append(f"  kv heads per layer: {record['num_key_value_heads_per_layer']}")
    padding = record.get("zero_filters_per_layer") or ()
    lines.append(f"  filters per layer:  {record['intermediate_size_per_layer']}"
                 + (f" (zero padding: {list(padding)})" if any(padding) else ""))
    lines.append("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in record["seconds"].items()))
    for key in ("eval_before", "eval_after"):
        if key in record:
            values = ", ".join(f"{k} {v:.2f}" for k, v in record[key].items() if k != "num_examples")
            lines.append(f"  dev {key.split('_')[1]}: {values}")
    return "\n".join(lines)


def _title(record: dict) -> str:
    recipe = record.get("recipe", {})
    if record.get("family") == "decoder":
        tuned = "" if not recipe.get("tune", True) else ", tuned weights" if recipe.get("tune_weights") else ", tuned masks"
        return f"pruned {record['model']} with the language-modelling loss ({record['method']}, " \
               f"{record['constraint']}{tuned})"
    tuned = ("" if record["method"] != "fisher" or not recipe.get("tune", True)
             else ", tuned weights" if recipe.get("tune_weights", True) else ", tuned masks")
    return f"pruned {record['model']} on {record['task']} ({record['method']}, {record['constraint']}{tuned})"


def _flops_line(record: dict) -> str:
    kept = f"{100 * record['flops_ratio']:.1f}% ({record['flops_after'] / 1e9:.2f} of {record['flops_before'] / 1e9:.2f} GFLOPs"
    if "context_len" in record:
        return (f"non-embedding FLOPs kept: {kept} at context {record['context_len']}); "
                f"LM head (not pruned): {record['lm_head_flops'] / 1e9:.1f} GFLOPs")
    return f"FLOPs kept: {kept} per example at seq len {record['seq_len']})"


def _latency_line(lat: dict) -> str:
    meta = lat["latency_table"]["meta"]
    return (f"latency ({meta.get('device', '?')}, batch {meta.get('batch')} x {meta.get('seq')}, "
            f"{meta.get('dtype')}): {lat['predicted_ms']:.3f} ms predicted by the table against "
            f"{lat['dense_ms']:.3f} ms dense ({lat['dense_ms'] / lat['predicted_ms']:.2f}x), "
            f"budget {lat['budget_ms']:.3f} ms")
