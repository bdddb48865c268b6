"""Runs the synchronous engine behind asyncio: one background loop owns the engine.

HTTP handlers never touch the engine directly while it steps: `add` and `abort` queue commands that
the loop applies between steps; `engine.step()` runs in a worker thread so the event loop keeps
serving (and noticing disconnects) during a step. Each request gets an asyncio.Queue of RequestOutputs.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor

from serve.engine import LLMEngine
from serve.sampling_params import SamplingParams

log = logging.getLogger("serve")


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.queues: dict[str, asyncio.Queue] = {}
        self._commands: list = []
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._ids = itertools.count()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def add(self, prompt_ids: list[int], params: SamplingParams, prefix: str = "req") -> tuple[str, asyncio.Queue]:
        """Validate now (ValueError for the caller), enqueue; outputs arrive on the returned queue."""
        self.engine.check_request(prompt_ids, params)
        request_id = f"{prefix}-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[request_id] = queue
        self._commands.append(lambda: self.engine.add_request(prompt_ids, params, request_id))
        self._wake.set()
        return request_id, queue

    def abort(self, request_id: str) -> None:
        if self.queues.pop(request_id, None) is not None:
            self._commands.append(lambda: self.engine.abort_request(request_id))
            self._wake.set()

    def _apply_commands(self) -> None:
        commands, self._commands = self._commands, []
        for command in commands:
            command()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._apply_commands()
            if not self.engine.has_unfinished_requests():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                outputs = await loop.run_in_executor(self._executor, self.engine.step)
            except Exception as err:  # a bug in a step must not take the server down silently
                log.exception("engine step failed")
                self._fail_all(err)
                continue
            for output in outputs:
                queue = self.queues.get(output.request_id)
                if queue is not None:
                    queue.put_nowait(output)
                    if output.finished:
                        del self.queues[output.request_id]

    def _fail_all(self, err: Exception) -> None:
        for request_id, queue in list(self.queues.items()):
            queue.put_nowait(err)
            self.abort(request_id)
