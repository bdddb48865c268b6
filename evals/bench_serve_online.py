"""Online serving benchmark: Poisson arrivals against the real `compress serve` HTTP server.

Starts the server process on 127.0.0.1, sends streaming `/v1/completions` requests (token-id prompts,
`ignore_eos`) with exponential inter-arrival gaps at `rate` requests/s, and records per request the
time to first token (TTFT), the gaps between streamed chunks (ITL) and the time per output token
after the first (TPOT = (latency - TTFT) / (tokens - 1)). Reports mean / p50 / p90 / p99 of each, in ms.
The same client drives a peer's OpenAI server (`run_online(..., launch=...)`).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path, port: int, server_args: list[str], timeout: float = 300) -> subprocess.Popen:
    """`compress serve PATH` on 127.0.0.1:`port`, returned once /health answers (see start_process)."""
    cmd = [sys.executable, "-m", "compress", "serve", str(path), "--port", str(port), *server_args]
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    return start_process(cmd, port, env, timeout)


def start_process(cmd: list[str], port: int, env: dict, timeout: float = 300) -> subprocess.Popen:
    """A server process, returned once http://127.0.0.1:`port`/health answers 200; RuntimeError with the
    server's log tail if it exits or does not come up. The log goes to a file (`proc.log`), not a pipe
    nobody reads, so a chatty server never blocks on a full pipe."""
    import urllib.request
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (it lives as long as the process)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    why = "exited" if proc.poll() is not None else "did not come up in time"
    proc.kill()
    proc.wait()
    log.seek(0)
    raise RuntimeError(f"server {why}:\n" + log.read()[-3000:])


async def _one(session, url: str, model: str, prompt: list[int], output_len: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "stream": True,
            "ignore_eos": True}
    start = time.perf_counter()
    stamps = []
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
        async for raw in response.content:
            line = raw.decode().strip()
            if line.startswith("data:") and line != "data: [DONE]":
                if json.loads(line[5:])["choices"]:
                    stamps.append(time.perf_counter())
    return {"start": start, "stamps": stamps}


async def _drive(port: int, model: str, prompts, output_len: int, rate: float, seed: int) -> tuple[list, float]:
    import aiohttp
    rng = random.Random(seed)
    url = f"http://127.0.0.1:{port}/v1/completions"
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        tasks, begin = [], time.perf_counter()
        for prompt in prompts:
            tasks.append(asyncio.create_task(_one(session, url, model, prompt, output_len)))
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - begin


def _stats(values) -> dict:
    arr = np.asarray(values, dtype=float) * 1000.0
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"mean": float(arr.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize(results: list[dict], seconds: float) -> dict:
    ttft = [r["stamps"][0] - r["start"] for r in results if r["stamps"]]
    itl = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    tpot = [(r["stamps"][-1] - r["stamps"][0]) / (len(r["stamps"]) - 1) for r in results if len(r["stamps"]) > 1]
    chunks = sum(len(r["stamps"]) for r in results)
    return {"requests": len(results), "seconds": seconds, "chunks_per_s": chunks / seconds,
            "ttft_ms": _stats(ttft), "tpot_ms": _stats(tpot), "itl_ms": _stats(itl)}


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def check_server(path, server_args: list[str]) -> dict:
    """Start `compress serve PATH`, then: its start-up log (KV blocks and tokens, decode mode), /health,
    one greedy completion, and the /metrics gauges of the decode graphs and the KV cache."""
    import urllib.request
    port, start = free_port(), time.perf_counter()
    proc = start_server(path, port, ["--served-model-name", "m", *server_args])
    row = {"startup_s": time.perf_counter() - start}
    base = f"http://127.0.0.1:{port}"
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
            row["health"] = r.status
        body = json.dumps({"model": "m", "prompt": [5, 6, 7, 8], "max_tokens": 8, "temperature": 0,
                           "ignore_eos": True}).encode()
        request = urllib.request.Request(f"{base}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            row["completion_tokens"] = json.loads(r.read())["usage"]["completion_tokens"]
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
            gauges = dict(line.split() for line in r.read().decode().splitlines() if line and line[0] != "#")
        row.update(graphs=int(gauges["serve_cuda_graphs_captured"]), kv_tokens=int(gauges["serve_kv_cache_tokens"]))
    finally:
        stop_server(proc)
        proc.log.seek(0)
        row["log"] = [line for line in proc.log.read().splitlines() if line.startswith(("KV cache", "memory", "decode"))]
    return row


def run_online(path, model_name: str, prompts, output_len: int, rate: float, server_args: list[str],
               seed: int = 0, launch=None, read_log=None) -> dict:
    """Poisson load against `compress serve PATH`, or against the server `launch(port)` starts (a Popen
    from start_process); `read_log(text)` adds what it returns from the stopped server's log."""
    port = free_port()
    proc = launch(port) if launch else start_server(path, port, ["--served-model-name", model_name, *server_args])
    try:
        results, seconds = asyncio.run(_drive(port, model_name, prompts, output_len, rate, seed))
    finally:
        stop_server(proc)
    row = {"rate": rate, **summarize(results, seconds)}
    if read_log:
        proc.log.seek(0)
        row.update(read_log(proc.log.read()))
    return row
