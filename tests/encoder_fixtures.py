"""Tiny encoder checkpoints for the encoder-serving tests, and an in-process HTTP server to ask.

`st_dir` writes a sentence-transformers layout (modules.json, 1_Pooling/config.json, Normalize) beside a
tiny model's files; `ServerThread` runs serve/encoder's aiohttp app on a free port in a background
thread (its own event loop), so a test asks it over real HTTP without starting a process.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

from _tiny import save_tiny_model_dir
from test_server import free_port, request as raw_request

KEY = "sk-test"


def st_dir(path: Path, kind: str, pooling: str | None = "mean", normalize: bool = True, with_head: bool = False,
           num_labels: int = 2) -> Path:
    """A tiny `kind` encoder; with `pooling`, sentence-transformers' files saying how it pools."""
    save_tiny_model_dir(path, kind, num_labels=num_labels, with_head=with_head)
    if pooling is None:
        return path
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    keys = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens"}
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64,
                                                                **{k: m == pooling for m, k in keys.items()}}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32}))
    return path


class ServerThread:
    """`with ServerThread(encoder, "tiny") as port:` serves the encoder app on 127.0.0.1:port."""

    def __init__(self, encoder, name: str = "tiny", api_key: str | None = KEY, limits=None):
        self.encoder, self.name, self.api_key, self.port = encoder, name, api_key, free_port()
        self.limits = limits
        self._ready, self._loop = threading.Event(), None

    def __enter__(self) -> int:
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "the encoder server did not start"
        return self.port

    def _serve(self) -> None:
        from aiohttp import web

        from serve.encoder.server import build_app

        self._loop = asyncio.new_event_loop()
        runner = web.AppRunner(build_app(self.encoder, self.name, self.api_key, self.limits))
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)


def request(port: int, method: str, path: str, body=None, key: str | None = KEY, raw: bytes | None = None):
    """(status, parsed JSON or text) of one HTTP request."""
    status, data = raw_request(port, method, path, body, key, raw)
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data.decode()
