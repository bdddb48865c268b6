"""`build_app` served on 127.0.0.1 from a background thread, for tests that need the engine at hand.

`LiveServer(engine, ...)` is a context manager: the app runs on its own event loop in a daemon thread,
bound to a free port (`.port`), with handler cancellation on as in `serve_forever`; leaving the block
shuts it down. Tests may reach into `server.app[ENGINE]` (to inject a fault) between requests.
"""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web

from serve.server import build_app


class LiveServer:
    def __init__(self, engine, model_name: str = "tiny", **app_kwargs):
        self.app = build_app(engine, model_name, **app_kwargs)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="live-server")
        self.runner = web.AppRunner(self.app, handler_cancellation=True)
        self.port = 0

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=60)
        return self

    async def _start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def run(self, fn, *args):
        """fn(*args) on the server's loop (between the engine's steps), returning its result."""
        async def call():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout=30)
