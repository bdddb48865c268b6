"""The steps of `evals/bench_serve.py --compare vllm`: each workload on the runtime, then on vLLM in a
process of its own (evals/bench_serve_vllm.py), rows of both systems in `results["vs"]`, `["vs_latency"]`
and `["vs_online"]` (rendered by bench_serve_report as one table per measure). A vLLM that does not import
gives rows that say "not run: <reason>"; the runtime's rows are produced either way.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from bench_serve import (
    _vocab_size,
    engine_info,
    main_workload,
    make_llm,
    make_prompts,
    release_memory,
    resolve,
    run_offline,
)
from bench_serve_vllm import (
    child_env,
    last_line,
    read_log,
    run_offline_child,
    server_command,
)


def limits(args, max_model_len: int | None = None) -> dict:
    """The runtime's limits, as vLLM takes them; its memory fraction only where --vllm-gpu-memory-utilization says."""
    return {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
            "max_model_len": max_model_len or args.max_model_len, "gpu_memory_utilization": args.vllm_gpu_memory_utilization}


def log_file(args, kind: str, label: str) -> Path:
    """Where a vLLM run's whole output goes: `vllm_logs/` beside --out (else the work directory)."""
    folder = (Path(args.out).parent if args.out else Path(args.workdir)) / "vllm_logs"
    folder.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^\w.-]+", "_", label).strip("_")[-80:]
    return folder / f"{kind}_{slug}.log"


def free_gb() -> float:
    """Free GPU memory when vLLM starts (the runtime's engine freed before), NaN without a GPU."""
    import torch
    return torch.cuda.mem_get_info()[0] / 1e9 if torch.cuda.is_available() else float("nan")


def offline_row(args, results: dict, workload: str, path, prompts, output_len: int, max_model_len: int | None = None,
                latency: dict | None = None) -> dict:
    """vLLM's offline row of a workload (with its batch-1 step when `latency` is given): a child
    process, or "not run: <reason>" where vLLM does not import."""
    name = f"vLLM {results['peer'].get('version') or ''}".strip()
    if not results["peer"].get("version"):
        return {"workload": workload, "system": "vLLM", "name": name, "error": f"not run: {results['peer']['reason']}"}
    spec = {"name": name, "model": str(path), "prompts": prompts, "output_len": output_len,
            "latency": latency, **limits(args, max_model_len)}
    row = {"workload": workload, "system": "vLLM", "free_gb_at_start": free_gb(),
           **run_offline_child(spec, args.vllm_python, args.vllm_path, log_file(args, "offline", workload))}
    return row


def online_row(args, results: dict, name: str, path, prompts, rate: float) -> dict:
    """vLLM's OpenAI server under the runtime's online client at `rate`."""
    from bench_serve_online import run_online, start_process
    if not results["peer"].get("version"):
        return {"model": name, "system": "vLLM", "rate": rate, "error": f"not run: {results['peer']['reason']}"}

    def launch(port: int):
        cmd = server_command(args.vllm_python, path, port, name, limits(args))
        return start_process(cmd, port, child_env(args.vllm_path), timeout=args.vllm_startup_s)
    log = log_file(args, "online", f"{name}_{rate}")

    def keep_log(text: str) -> dict:
        log.write_text(text)
        return {**read_log(text), "log": str(log)}
    try:
        row = run_online(path, name, prompts, args.output_len, rate, [], args.seed, launch=launch, read_log=keep_log)
    except RuntimeError as err:
        log.write_text(str(err))
        return {"model": name, "system": "vLLM", "rate": rate, "error": last_line(str(err)), "log": str(log)}
    return {"model": name, "system": "vLLM", **row}


def bench_vllm_main(args, name: str, results: dict, prompts) -> None:
    """vLLM on the main workload, with its batch-1 step on the runtime's latency prompt."""
    path, config = resolve(args, name)
    prompt_len, output_len = min(512, args.max_model_len // 2), min(128, args.max_model_len // 4)
    latency = {"prompt": make_prompts(1, prompt_len, prompt_len, config["vocab_size"], seed=7)[0], "output_len": output_len}
    row = offline_row(args, results, main_workload(args, name), path, prompts, args.output_len, latency=latency)
    results["vs"].append(row)
    if "latency" in row:
        results["vs_latency"].append({"model": name, "system": row["name"], **row.pop("latency")})
    print(json.dumps(row), flush=True)


def bench_vllm_online(args, name: str, results: dict, prompts, rate: float) -> None:
    path, _ = resolve(args, name)
    row = online_row(args, results, name, path, prompts[:args.online_requests], rate)
    results["vs_online"].append(row)
    print(json.dumps(row), flush=True)


def bench_workload(args, w: dict, results: dict) -> None:
    """Another workload on the runtime (and on vLLM with --compare vllm), each engine freed before the next."""
    prompts = make_prompts(w["num_requests"], w["min_prompt"], w["max_prompt"], _vocab_size(w["model"]), args.seed)
    path, _ = resolve(args, w["model"])
    start = time.perf_counter()
    llm = make_llm(path, args, w["max_model_len"])
    init_s = time.perf_counter() - start
    row = {"workload": w["label"], "system": "serve", **run_offline(llm, prompts, w["output_len"], "serve"),
           "init_s": init_s, **engine_info(llm)}
    results["vs"].append(row)
    print(json.dumps(row), flush=True)
    del llm
    release_memory()
    if args.compare == "vllm":
        row = offline_row(args, results, w["label"], path, prompts, w["output_len"], w["max_model_len"])
        results["vs"].append(row)
        print(json.dumps(row), flush=True)
