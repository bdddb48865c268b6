"""The server that evals/reliability.py probes: a tiny Gemma 3 behind `serve_forever`, with fault hooks.

Run as a script (`python evals/reliability_server.py MODEL_DIR PORT [--setting cpu|gpu] [--die]`) it
serves with a small KV pool and short body (2 s) and write (5 s) deadlines, and injects faults keyed on
a request's seed: 666 makes its sampling raise, 667 the appending of its token, 668 the whole step it
is part of; `--die` makes the engine loop itself raise once any request exists. `Server` starts that
process from the probing side and samples its resident memory.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from evals.loopback import call  # noqa: E402

MODEL = "tiny"
SETTINGS = {
    "cpu": dict(num_kv_blocks=24, max_model_len=64, streams=8, stream_tokens=30, disconnects=4, innocent_tokens=40),
    "gpu": dict(num_kv_blocks=96, max_model_len=128, streams=48, stream_tokens=100, disconnects=16,
                innocent_tokens=100),
}
FAULT_SEEDS = {"sampling": 666, "append": 667, "step": 668}


def _raise(what: str):
    raise RuntimeError(f"injected {what} fault")


def _inject_faults(engine, die: bool) -> None:
    import serve.engine as engine_module
    real_sample, real_append, real_run = engine_module.sample, engine._append, engine.runner.run

    def seeded(seqs, fault: str) -> bool:
        return any(seq.params.seed == FAULT_SEEDS[fault] for seq in seqs)
    engine_module.sample = lambda logits, seqs, argmax=None: (
        _raise("sampling") if seeded(seqs, "sampling") else real_sample(logits, seqs, argmax))
    engine._append = lambda seq, token, lp: _raise("append") if seeded([seq], "append") else real_append(seq, token, lp)
    engine.runner.run = lambda batch: _raise("step") if seeded(batch.seqs, "step") else real_run(batch)
    if die:
        engine.has_unfinished_requests = lambda: _raise("loop") if engine.requests else False


def serve(path: str, port: int, setting: str, die: bool) -> None:
    from serve.config import EngineConfig
    from serve.context import ServerLimits
    from serve.engine import LLMEngine
    from serve.server import serve_forever
    s = SETTINGS[setting]
    engine = LLMEngine(EngineConfig(model=path, block_size=4, max_num_seqs=16, max_num_batched_tokens=64,
                                    num_kv_blocks=s["num_kv_blocks"], max_model_len=s["max_model_len"]))
    _inject_faults(engine, die)
    serve_forever(engine, MODEL, "127.0.0.1", port, limits=ServerLimits(body_timeout_s=2.0, write_timeout_s=5.0))


class Server:
    """The server subprocess, with a thread sampling its resident memory (`peak`)."""

    def __init__(self, path: Path, setting: str, die: bool = False):
        import psutil
        from test_server import free_port
        self.port = free_port()
        self.log = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, __file__, str(path), str(self.port), "--setting", setting] + (["--die"] if die else [])
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while call(self.port, "GET", "/health", timeout=2).status != 200:
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"server did not come up: {self.tail()}")
            time.sleep(0.2)
        self.process, self.peak, self.running = psutil.Process(self.proc.pid), 0, True
        threading.Thread(target=self._sample_memory, daemon=True).start()

    def rss(self) -> int:
        return self.process.memory_info().rss

    def _sample_memory(self) -> None:
        while self.running and self.proc.poll() is None:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.05)

    def tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-2000:]

    def stop(self) -> None:
        self.running = False
        self.proc.terminate()
        self.proc.wait(timeout=30)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("port", type=int)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    parser.add_argument("--die", action="store_true")
    args = parser.parse_args()
    serve(args.model_dir, args.port, args.setting, args.die)
