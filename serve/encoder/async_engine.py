"""Runs the encoder engine behind asyncio, pooling the inputs of every client into shared batches.

Handlers `await submit(kind, token_ids)`; the background loop takes everything pending of one kind
at once and runs it as one `Encoder.run` call in a worker thread (so the token-budget batches mix the
inputs of many requests, and the event loop keeps serving meanwhile), then hands each request its rows.
A request whose client went away is skipped when results are handed out; a failed forward fails the
requests it carried, never the loop.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import torch

from serve.encoder.engine import Encoder

log = logging.getLogger("serve")


class AsyncEncoder:
    def __init__(self, encoder: Encoder):
        self.encoder = encoder
        self.pending: list[tuple[str, list[list[int]], asyncio.Future]] = []
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def num_waiting(self) -> int:
        return sum(len(ids) for _, ids, _ in self.pending)

    async def submit(self, kind: str, token_ids: list[list[int]]) -> torch.Tensor:
        """The rows of `kind` for these model inputs, computed in batches shared with other requests."""
        future = asyncio.get_running_loop().create_future()
        self.pending.append((kind, token_ids, future))
        self._wake.set()
        return await future

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.pending:
                kind = self.pending[0][0]
                taken = [p for p in self.pending if p[0] == kind]
                self.pending = [p for p in self.pending if p[0] != kind]
                await self._run(kind, taken)

    async def _run(self, kind: str, taken: list) -> None:
        inputs = [ids for _, token_ids, _ in taken for ids in token_ids]
        try:
            rows = await asyncio.get_running_loop().run_in_executor(self._executor, self.encoder.run, kind, inputs)
        except Exception as err:  # a bug in a forward must not take the server down
            log.exception("encoder forward failed")
            for *_, future in taken:
                if not future.done():
                    future.set_exception(err)
            return
        start = 0
        for _, token_ids, future in taken:
            if not future.done():
                future.set_result(rows[start:start + len(token_ids)])
            start += len(token_ids)
