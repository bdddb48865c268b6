"""Reliability of `compress serve` under hostile input and injected faults, on 127.0.0.1 (issue #33).

CPU (the committed result):  python evals/reliability.py
Larger setting, for the GPU: python evals/reliability.py --setting gpu --out evals/results/reliability_gpu

Starts a tiny seeded Gemma 3 server in a subprocess (evals/reliability_server.py: a small KV pool,
short body and write deadlines, fault hooks keyed on a request's seed). Then, each innocent request
being a greedy stream whose text must equal the offline engine's:
1. every case of evals/hostile.py and a 50 MB body, each sent while an innocent stream runs;
2. per-request faults beside innocent streams, and a step fault alone (it fails the requests it runs);
3. concurrent streams under KV pressure (preemption) against sequential greedy;
4. mid-stream disconnects; half a body (the server must cut the client off);
5. a second server whose engine loop is made to die: what its request got and its exit status.
Writes OUT.md and OUT.json: what every request got, innocent requests harmed, KV blocks still in use
at the end, /health's slowest answer, and the server's resident memory before, at peak and after.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from evals import hostile  # noqa: E402
from evals.loopback import call, in_background, metric, send_raw, stream  # noqa: E402
from evals.reliability_server import FAULT_SEEDS, MODEL, SETTINGS, Server  # noqa: E402

TIMEOUT = 60

class Run:
    def __init__(self, server: Server, reference, setting: dict):
        self.server, self.reference, self.setting = server, reference, setting
        self.rows: list[dict] = []
        self.innocents = self.harmed = 0
        self.health_worst = 0.0

    def innocent(self, prompt: str = "the quick brown fox", max_tokens: int | None = None):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens or self.setting["innocent_tokens"],
                "temperature": 0, "ignore_eos": True}
        return in_background(stream, self.server.port, "/v1/completions", body, timeout=TIMEOUT)

    def judge(self, threads, prompt_tokens: list[tuple[str, int]]) -> bool:
        """Wait for innocent streams; count them and those whose text is not the reference's."""
        ok = True
        for (thread, result), (prompt, max_tokens) in zip(threads, prompt_tokens):
            thread.join(TIMEOUT)
            got = result.get("value")
            good = got is not None and got.done and got.texts() == {0: self.reference(prompt, max_tokens)}
            self.innocents, self.harmed, ok = self.innocents + 1, self.harmed + (not good), ok and good
        return ok

    def record(self, name: str, issue: str, expect: str, got: str, seconds: float, innocent_ok: bool | None,
               ok: bool, requests: int = 1) -> None:
        """One checked row; `requests`: how many requests it sent beside the innocent streams."""
        self.rows.append(dict(name=name, issue=issue, expect=expect, got=got, seconds=round(seconds, 3),
                              innocent_ok=innocent_ok, ok=ok, requests=requests))

    def probe_health(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.health_worst = max(self.health_worst, call(self.server.port, "GET", "/health", timeout=30).seconds)
            time.sleep(0.1)

    def corpus(self, cases: list[hostile.Case]) -> None:
        tokens = self.setting["innocent_tokens"]
        for case in cases:
            threads = [self.innocent()]
            reply = call(self.server.port, case.method, case.path, raw=hostile.payload(case), timeout=TIMEOUT)
            innocent_ok = self.judge(threads, [("the quick brown fox", tokens)])
            body = reply.json()
            message = body["error"]["message"][:90] if reply.is_openai_error() else (reply.error or "")
            ok = reply.status == case.expect and reply.is_openai_error() == (case.expect != 200)
            self.record(case.name, case.issue, str(case.expect), f"{reply.status} {message}".strip(), reply.seconds,
                        innocent_ok, ok)

    def faults(self) -> None:
        for fault in ("sampling", "append"):
            threads = [self.innocent(), self.innocent("hello world, how are")]
            body = {"model": MODEL, "prompt": "hello", "max_tokens": 8, "temperature": 1.0, "seed": FAULT_SEEDS[fault]}
            got = stream(self.server.port, "/v1/completions", body, timeout=TIMEOUT)
            innocent_ok = self.judge(threads, [("the quick brown fox", self.setting["innocent_tokens"]),
                                               ("hello world, how are", self.setting["innocent_tokens"])])
            errors = got.errors()
            self.record(f"injected {fault} fault (stream)", "1,2", "error event", f"{got.status} error event: "
                        f"{errors[0]['message'][:60]}" if errors else f"{got.status} no error event", got.seconds,
                        innocent_ok, bool(errors) and got.done)
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 8, "seed": FAULT_SEEDS["step"]}
        reply = call(self.server.port, "POST", "/v1/completions", body, timeout=TIMEOUT)
        after = call(self.server.port, "POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2})
        self.record("injected step fault (alone), then a request", "1", "500, then 200",
                    f"{reply.status}, then {after.status}", reply.seconds, None,
                    reply.status == 500 and reply.is_openai_error() and after.status == 200, requests=2)

    def pressure(self) -> None:
        prompts = [f"{word} paged attention {i}" for i, word in enumerate(["the", "hello", "caf\u00e9", "0123"] * 16)]
        prompts = prompts[:self.setting["streams"]]
        preempted = metric(self.server.port, "serve_preemptions_total")
        start = time.perf_counter()
        threads = [self.innocent(p, self.setting["stream_tokens"]) for p in prompts]
        ok = self.judge(threads, [(p, self.setting["stream_tokens"]) for p in prompts])
        preemptions = metric(self.server.port, "serve_preemptions_total") - preempted
        self.record(f"{len(prompts)} concurrent greedy streams under KV pressure", "6", "equal to sequential greedy",
                    f"{'equal' if ok else 'NOT equal'}, {preemptions:.0f} preemptions", time.perf_counter() - start,
                    ok, ok and preemptions > 0, requests=0)

    def disconnects(self) -> None:
        aborted = metric(self.server.port, "serve_requests_aborted_total")
        body = {"model": MODEL, "max_tokens": self.setting["innocent_tokens"], "temperature": 0, "ignore_eos": True}
        quitters = [in_background(stream, self.server.port, "/v1/completions", {**body, "prompt": f"bye {i}"},
                                  timeout=TIMEOUT, stop_after=3) for i in range(self.setting["disconnects"])]
        threads = [self.innocent()]
        for thread, _ in quitters:
            thread.join(TIMEOUT)
        innocent_ok = self.judge(threads, [("the quick brown fox", self.setting["innocent_tokens"])])
        deadline = time.time() + TIMEOUT
        port = self.server.port
        while metric(port, "serve_requests_aborted_total") < aborted + len(quitters) and time.time() < deadline:
            time.sleep(0.05)
        count = metric(self.server.port, "serve_requests_aborted_total") - aborted
        self.record(f"{len(quitters)} streams hang up after 3 events", "6", f"{len(quitters)} aborted",
                    f"{count:.0f} aborted", 0.0, innocent_ok, count == len(quitters), requests=len(quitters))

    def half_body(self) -> None:
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n{\"model\": ")
        threads = [self.innocent()]
        reply = send_raw(self.server.port, head, timeout=TIMEOUT)
        innocent_ok = self.judge(threads, [("the quick brown fox", self.setting["innocent_tokens"])])
        self.record("half a declared body, then silence", "4", "408 and closed within the 2 s deadline",
                    f"{reply.status}, closed after {reply.seconds:.1f} s", reply.seconds, innocent_ok,
                    reply.status == 408 and reply.seconds < 5)


def big_body_case(megabytes: int) -> hostile.Case:
    raw = b'{"model": "%s", "prompt": "' % MODEL.encode() + b"a" * (megabytes * 2**20) + b'"}'
    return hostile.Case(f"prompt of {megabytes} MB", "/v1/completions", raw=raw, expect=413, issue="3")


def dying_server(path: Path, setting: str) -> dict:
    server = Server(path, setting, die=True)
    reply = call(server.port, "POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2})
    try:
        code = server.proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        code = None
        server.proc.kill()
    logged = "injected loop fault" in server.tail()
    return dict(name="engine loop made to die", issue="1", expect="500 to its request, logged, exit non-zero",
                got=f"{reply.status}, {'logged' if logged else 'NOT logged'}, exit status {code}",
                seconds=round(reply.seconds, 3), innocent_ok=None,
                ok=reply.status == 500 and logged and code not in (0, None), requests=1)


def settle(port: int) -> tuple[float, float]:
    """KV blocks in use and sequences running, once the server had time to free what it holds."""
    deadline = time.time() + TIMEOUT
    while metric(port, "serve_kv_blocks_used") != 0 and time.time() < deadline:
        time.sleep(0.1)
    return metric(port, "serve_kv_blocks_used"), metric(port, "serve_requests_running")


def measure(path: Path, setting_name: str) -> dict:
    from serve import LLM, SamplingParams
    from serve.context import ServerLimits
    setting = SETTINGS[setting_name]
    llm, cache = LLM(path, block_size=4, max_model_len=setting["max_model_len"]), {}

    def reference(prompt: str, max_tokens: int) -> str:
        if (prompt, max_tokens) not in cache:
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            cache[prompt, max_tokens] = llm.generate(prompt, params)[0].outputs[0].text
        return cache[prompt, max_tokens]
    server = Server(path, setting_name)
    try:
        warm = call(server.port, "POST", "/v1/completions", {"model": MODEL, "prompt": "warm up", "max_tokens": 4})
        before, run, stop = server.rss(), Run(server, reference, setting), threading.Event()
        run.record("warm-up", "-", "200", str(warm.status), warm.seconds, None, warm.status == 200)
        prober = threading.Thread(target=run.probe_health, args=(stop,), daemon=True)
        prober.start()
        cases = hostile.all_cases(MODEL, 320, setting["max_model_len"], ServerLimits().max_body_bytes, 16)
        run.corpus(cases + [big_body_case(50)])
        run.faults()
        run.pressure()
        run.disconnects()
        run.half_body()
        stop.set()
        prober.join(TIMEOUT)
        blocks, running = settle(server.port)
        memory = dict(before=before, peak=server.peak, after=server.rss())
        healthy = call(server.port, "GET", "/health").status == 200
    finally:
        server.stop()
    run.rows.append(dying_server(path, setting_name))
    return dict(setting=setting_name, rows=run.rows, num_hostile=len(cases) + 1, innocents=run.innocents,
                harmed=run.harmed, kv_blocks_in_use=blocks, running=running, memory_bytes=memory,
                healthy_after=healthy, health_worst_s=round(run.health_worst, 3),
                faults_injected=4 + setting["disconnects"] + 1)


def write(result: dict, out: Path, command: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, **result}, indent=2) + "\n")
    mb = {k: f"{v / 2**20:.0f} MB" for k, v in result["memory_bytes"].items()}
    rows = result["rows"]
    lines = ["# Reliability of `compress serve` under hostile input and injected faults (issue #33)", "",
             f"Command: `{command}` ({result['seconds']} s on {result['machine']})", "",
             "Tiny seeded Gemma 3 (4 layers, hidden 64, vocab 320) served on 127.0.0.1 by a subprocess; "
             f"setting `{result['setting']}`: {SETTINGS[result['setting']]}.", "",
             "| figure | value |", "| --- | --- |",
             f"| requests sent (probes + innocent streams; /health and /metrics not counted) | "
             f"{sum(r['requests'] for r in rows) + result['innocents']} |",
             f"| hostile or malformed requests | {result['num_hostile']} |",
             f"| failures injected (3 engine faults, 1 loop death, {SETTINGS[result['setting']]['disconnects']} "
             f"disconnects, 1 half body) | {result['faults_injected']} |",
             f"| rows answered as expected | {sum(r['ok'] for r in rows)} of {len(rows)} |",
             f"| innocent requests / harmed | {result['innocents']} / {result['harmed']} |",
             f"| KV blocks in use after the run (leaked) | {result['kv_blocks_in_use']:.0f} |",
             f"| sequences running after the run | {result['running']:.0f} |",
             f"| /health after the run | {'200' if result['healthy_after'] else 'NOT 200'} |",
             f"| slowest /health answer during the run | {result['health_worst_s']} s |",
             f"| server RSS before / peak / after | {mb['before']} / {mb['peak']} / {mb['after']} |", "",
             "## What each request got", "",
             "| request | issue item | expected | got | seconds | innocent beside it | as expected |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        innocent = {None: "-", True: "equal", False: "HARMED"}[r["innocent_ok"]]
        got = r["got"].replace("|", "\\|")
        lines.append(f"| {r['name']} | {r['issue']} | {r['expect']} | {got} | {r['seconds']} | {innocent} | "
                     f"{'yes' if r['ok'] else 'NO'} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _machine() -> str:
    import os
    import platform

    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return f"{device}; Python {platform.python_version()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    parser.add_argument("--out", default="evals/results/reliability", help="output path without suffix")
    args = parser.parse_args(argv)
    from serve_fixtures import gemma3_config, random_model, save_model
    command = "python evals/reliability.py" + (f" --setting {args.setting}" if args.setting != "cpu" else "") + (
        f" --out {args.out}" if args.out != "evals/results/reliability" else "")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(random_model(gemma3_config(), seed=5), Path(tmp) / MODEL)
        result = measure(path, args.setting)
    result["machine"] = _machine()
    result["seconds"] = round(time.perf_counter() - start, 1)
    write(result, REPO / args.out, command)
    print((REPO / args.out).with_suffix(".md").read_text())
    return 0 if all(r["ok"] for r in result["rows"]) and result["harmed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
