"""A bounded HTTP client for probing `compress serve` on 127.0.0.1: JSON calls, SSE streams, raw bytes.

Every call has a deadline (the socket timeout), so a server that hangs makes a call fail with
`timed out`, never wait forever; nothing but 127.0.0.1 is reached. Used by the fault tests
(tests/test_server_faults.py) and the reliability run (evals/reliability.py).
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from dataclasses import dataclass, field

HOST = "127.0.0.1"


@dataclass
class Reply:
    status: int                  # 0: no HTTP answer (see `error`)
    body: bytes = b""
    seconds: float = 0.0
    error: str | None = None     # what went wrong on the client's side (timed out, connection reset)

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def is_openai_error(self) -> bool:
        body = self.json()
        return (isinstance(body, dict) and isinstance(body.get("error"), dict)
                and isinstance(body["error"].get("message"), str) and "Traceback" not in body["error"]["message"])


@dataclass
class Streamed:
    status: int
    events: list = field(default_factory=list)    # parsed `data:` payloads; "[DONE]" as the string
    seconds: float = 0.0
    error: str | None = None

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == "[DONE]"

    def texts(self) -> dict[int, str]:
        """choice index -> its text joined over the chunks (completions or chat deltas)."""
        out: dict[int, str] = {}
        for event in self.events:
            for choice in event.get("choices", []) if isinstance(event, dict) else []:
                piece = choice.get("text", (choice.get("delta") or {}).get("content")) or ""
                out[choice["index"]] = out.get(choice["index"], "") + piece
        return out

    def errors(self) -> list[dict]:
        return [e["error"] for e in self.events if isinstance(e, dict) and "error" in e]


def _headers(key: str | None) -> dict:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def call(port: int, method: str, path: str, body=None, *, raw: bytes | None = None, key: str | None = None,
         timeout: float = 30.0) -> Reply:
    start = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, data, _headers(key))
        response = conn.getresponse()
        return Reply(response.status, response.read(), time.perf_counter() - start)
    except (OSError, http.client.HTTPException) as err:
        return Reply(0, b"", time.perf_counter() - start, f"{type(err).__name__}: {err}")
    finally:
        conn.close()


def stream(port: int, path: str, body: dict, *, key: str | None = None, timeout: float = 30.0,
           stop_after: int | None = None) -> Streamed:
    """POST a streaming request and read its events; `stop_after=k` hangs up after k events."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    result = Streamed(0)
    try:
        conn.request("POST", path, json.dumps({**body, "stream": True}).encode(), _headers(key))
        response = conn.getresponse()
        result.status = response.status
        if response.status != 200:
            result.events.append(json.loads(response.read() or b"null"))
            return result
        while stop_after is None or len(result.events) < stop_after:
            line = response.readline()
            if not line:
                break
            if line.startswith(b"data: "):
                payload = line[6:].strip()
                result.events.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    except (OSError, http.client.HTTPException, ValueError) as err:
        result.error = f"{type(err).__name__}: {err}"
    finally:
        conn.close()
        result.seconds = time.perf_counter() - start
    return result


def send_raw(port: int, data: bytes, *, timeout: float = 30.0, then_wait: float = 0.0) -> Reply:
    """Send bytes as they are (a lying Content-Length, half a body), wait `then_wait` s, read the answer
    until the server closes or `timeout` passes."""
    start = time.perf_counter()
    received = b""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(data)
            time.sleep(then_wait)
            while chunk := sock.recv(65536):
                received += chunk
    except OSError as err:
        return Reply(_status(received), received, time.perf_counter() - start, f"{type(err).__name__}: {err}")
    return Reply(_status(received), received.partition(b"\r\n\r\n")[2], time.perf_counter() - start)


def _status(head: bytes) -> int:
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[0].startswith(b"HTTP/") and parts[1].isdigit() else 0


def metric(port: int, name: str) -> float:
    """One sample of /metrics (NaN where absent)."""
    text = call(port, "GET", "/metrics").body.decode()
    return next((float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " ")), float("nan"))


def in_background(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    """fn(*args, **kwargs) in a daemon thread; its return value lands in the dict under "value"."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn(*args, **kwargs)), daemon=True)
    thread.start()
    return thread, result
