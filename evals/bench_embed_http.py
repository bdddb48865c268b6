"""The HTTP half of evals/bench_embed.py: a `compress serve` process, concurrent clients, and latency at a
fixed request rate (Poisson arrivals), measured from the client side with aiohttp."""

from __future__ import annotations

import asyncio
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


class Server:
    """`with Server(dir, *flags) as url:` runs `compress serve` on a free port until the block ends."""

    def __init__(self, path, *flags: str):
        self.path, self.flags = str(path), flags

    def __enter__(self) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # the caller's path stays (packages installed beside the repository); the log goes to a file, since
        # a pipe nobody reads would stall a chatty server once its buffer is full
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.log = tempfile.NamedTemporaryFile("w+", prefix="bench_embed_server_", suffix=".log")
        self.proc = subprocess.Popen([sys.executable, "-m", "compress", "serve", self.path, "--port", str(port),
                                      "--served-model-name", "m", *self.flags], env=env, cwd=REPO,
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True)
        self.url = f"http://127.0.0.1:{port}"
        asyncio.run(_wait_healthy(self.url, self.proc, self.log))
        return self.url

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


async def _wait_healthy(url: str, proc, log, timeout: float = 300) -> None:
    import aiohttp

    deadline = time.time() + timeout
    async with aiohttp.ClientSession() as session:
        while time.time() < deadline:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"compress serve exited: {log.read()[-2000:]}")
            try:
                async with session.get(url + "/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("compress serve did not become healthy")


async def _post(session, url: str, texts: list[str], path: str = "/v1/embeddings") -> int:
    async with session.post(url + path, json={"model": "m", "input": texts, "encoding_format": "base64"}) as r:
        body = await r.json()
        if r.status != 200:
            raise RuntimeError(f"{path} answered {r.status}: {body}")
        return body["usage"]["prompt_tokens"]


def throughput(url: str, texts: list[str], clients: int, per_request: int, path: str = "/v1/embeddings") -> dict:
    """Inputs/s and tokens/s of `clients` concurrent clients sending `per_request` texts a request."""
    return asyncio.run(_throughput(url, texts, clients, per_request, path))


async def _throughput(url, texts, clients, per_request, path) -> dict:
    import aiohttp

    chunks = [texts[i:i + per_request] for i in range(0, len(texts), per_request)]
    queue = asyncio.Queue()
    for chunk in chunks:
        queue.put_nowait(chunk)
    tokens = []

    async def client(session):
        while not queue.empty():
            tokens.append(await _post(session, url, queue.get_nowait(), path))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        await _post(session, url, texts[:per_request], path)  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        seconds = time.perf_counter() - start
    return {"inputs_per_s": len(texts) / seconds, "tokens_per_s": sum(tokens) / seconds, "seconds": seconds,
            "clients": clients, "per_request": per_request}


def latency(url: str, texts: list[str], rate: float, duration: float, seed: int = 0) -> dict:
    """Latency percentiles (ms) of one-text requests arriving at `rate` per second (Poisson) for `duration` s."""
    return asyncio.run(_latency(url, texts, rate, duration, seed))


async def _latency(url, texts, rate, duration, seed) -> dict:
    import aiohttp

    rng, times, tasks = random.Random(seed), [], []

    async def one(session, text):
        start = time.perf_counter()
        await _post(session, url, [text])
        times.append(1000 * (time.perf_counter() - start))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await _post(session, url, texts[:1])
        start = time.perf_counter()
        while time.perf_counter() - start < duration:
            tasks.append(asyncio.create_task(one(session, rng.choice(texts))))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    return {"rate": rate, "requests": len(times), "p50_ms": p50, "p90_ms": p90, "p99_ms": p99,
            "max_ms": max(times)}
