"""vLLM as the peer of evals/bench_serve.py (`--compare vllm`): the same checkpoint directory, the same
token-id prompts, the same limits (max_num_seqs, max_num_batched_tokens, max_model_len), EOS ignored,
greedy, prefix caching off, vLLM's defaults otherwise (CUDA graphs, torch.compile, its own KV sizing).

Every vLLM run is a process of its own, started after the runtime's engine has been freed, so each
system has the GPU to itself in turn: `python evals/bench_serve_vllm.py SPEC.json OUT.json` for the
offline throughput and batch-1 step (this file's `child`), `python -m vllm.entrypoints.openai.api_server`
for the online rows. What vLLM chose (attention backend, KV cache tokens and blocks, CUDA-graph mode) is
read from its objects and its log. Where vLLM does not import, `probe` gives the reason in one line
and the caller reports "not run: <reason>".
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
PROBE = ("import vllm; from vllm import LLM, SamplingParams; import vllm.entrypoints.openai.api_server; "
         "print(vllm.__version__)")
_LOG_PATTERNS = {
    "attention_backend": r"Using (\w+) attention backend out of potential backends",
    "attention_backend_selected": r"Using (\w+) backend\.",
    "kv_cache_tokens": r"GPU KV cache size: ([\d,]+) tokens",
    "graph_capture": r"Graph capturing finished in (.*)",
}


def child_env(vllm_path: str | None) -> dict:
    env = dict(os.environ)
    if vllm_path:
        env["PYTHONPATH"] = f"{vllm_path}:{env.get('PYTHONPATH', '')}"
    return env


def last_line(text: str) -> str:
    """The line that says what failed: the last exception line that is not a wrapper pointing elsewhere
    (vLLM's engine core re-raises with "See root cause above"), else the last non-empty line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", line)]
    causes = [line for line in errors if "root cause above" not in line]
    return (causes or errors or lines or ["no output"])[-1][:300]


def probe(python: str, vllm_path: str | None) -> tuple[str | None, str]:
    """(vLLM's version, "") where the offline API and the OpenAI server import, else (None, why)."""
    try:
        run = subprocess.run([python, "-c", PROBE], env=child_env(vllm_path), capture_output=True, text=True,
                             timeout=600, check=False, cwd="/")
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"{type(err).__name__}: {err}"[:300]
    if run.returncode == 0:
        return run.stdout.strip().splitlines()[-1], ""
    return None, last_line(run.stderr or run.stdout)


def read_log(text: str) -> dict:
    """What vLLM chose, as its log states it."""
    found = {}
    for key, pattern in _LOG_PATTERNS.items():
        match = re.search(pattern, text)
        if match:
            found[key] = match.group(1).replace(",", "") if key == "kv_cache_tokens" else match.group(1).strip()
    if "kv_cache_tokens" in found:
        found["kv_cache_tokens"] = int(found["kv_cache_tokens"])
    return found


def run_offline_child(spec: dict, python: str, vllm_path: str | None, log_path: Path, timeout: float = 1800) -> dict:
    """One child process: offline throughput on spec's prompts (and the batch-1 step when asked); its
    whole output stays in `log_path`."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp, "spec.json"), Path(tmp, "out.json")
        spec_path.write_text(json.dumps(spec))
        with open(log_path, "w") as log:
            try:
                run = subprocess.run([python, str(HERE), str(spec_path), str(out_path)], env=child_env(vllm_path),
                                     stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False)
                code = run.returncode
            except subprocess.TimeoutExpired:
                code = f"timed out after {timeout:.0f} s"
        text = log_path.read_text(errors="replace")
        if code != 0 or not out_path.is_file():
            return {"name": spec["name"], "error": f"vLLM exited ({code}): {last_line(text)}", "log": str(log_path)}
        return {**json.loads(out_path.read_text()), **read_log(text), "log": str(log_path)}


def server_command(python: str, path, port: int, name: str, limits: dict) -> list[str]:
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path), "--served-model-name", name,
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16", "--seed", "0",
            "--max-num-seqs", str(limits["max_num_seqs"]), "--max-num-batched-tokens",
            str(limits["max_num_batched_tokens"]), "--max-model-len", str(limits["max_model_len"]),
            "--no-enable-prefix-caching"] + _memory_flag(limits)


def _memory_flag(limits: dict) -> list[str]:
    fraction = limits.get("gpu_memory_utilization")
    return [] if fraction is None else ["--gpu-memory-utilization", str(fraction)]


# ---- the child process (runs where vLLM imports) ----------------------------------------------------


def _greedy(max_tokens: int):
    from vllm import SamplingParams
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def _settings(llm) -> dict:
    import vllm
    config = llm.llm_engine.vllm_config
    settings = {"vllm": vllm.__version__, "num_gpu_blocks": config.cache_config.num_gpu_blocks,
                "block_size": config.cache_config.block_size,
                "gpu_memory_utilization": config.cache_config.gpu_memory_utilization,
                "cudagraph_mode": str(config.compilation_config.cudagraph_mode),
                "chunked_prefill": config.scheduler_config.enable_chunked_prefill}
    try:
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
        settings["flash_attn_version"] = get_flash_attn_version(head_size=config.model_config.get_head_size())
    except (ImportError, AttributeError, AssertionError, RuntimeError) as err:  # a detail of the report
        settings["flash_attn_version"] = f"unknown ({type(err).__name__})"
    return settings


def batch1_step_ms(llm, prompt: list[int], output_len: int) -> dict:
    """Time per output token of one sequence: (time for N tokens - time for 1) / (N - 1), best of 3."""
    from vllm.inputs import TokensPrompt
    one = TokensPrompt(prompt_token_ids=prompt)
    times = {}
    for n in (1, output_len):
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            llm.generate([one], _greedy(n), use_tqdm=False)
            runs.append(time.perf_counter() - start)
        times[n] = min(runs)
    return {"step_ms": (times[output_len] - times[1]) / (output_len - 1) * 1e3, "prefill_ms": times[1] * 1e3,
            "context": len(prompt) + output_len // 2}


def child(spec: dict) -> dict:
    from vllm import LLM
    from vllm.inputs import TokensPrompt
    start = time.perf_counter()
    limits = {k: spec[k] for k in ("max_num_seqs", "max_num_batched_tokens", "max_model_len")}
    if spec.get("gpu_memory_utilization") is not None:
        limits["gpu_memory_utilization"] = spec["gpu_memory_utilization"]
    llm = LLM(model=spec["model"], tokenizer=spec["model"], dtype="bfloat16", seed=0, enable_prefix_caching=False,
              **limits)
    init_s = time.perf_counter() - start
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    llm.generate(prompts[:4], _greedy(8), use_tqdm=False)                       # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, _greedy(spec["output_len"]), use_tqdm=False)
    row = {"name": spec["name"], "seconds": time.perf_counter() - start, "requests": len(prompts),
           "prompt_tokens": sum(map(len, spec["prompts"])),
           "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs), "init_s": init_s, **_settings(llm)}
    if spec.get("latency"):
        row["latency"] = batch1_step_ms(llm, spec["latency"]["prompt"], spec["latency"]["output_len"])
    return row


if __name__ == "__main__":
    spec_file, out_file = sys.argv[1:3]
    Path(out_file).write_text(json.dumps(child(json.loads(Path(spec_file).read_text()))))
