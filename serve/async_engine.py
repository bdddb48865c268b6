"""Runs the synchronous engine behind asyncio: one background loop owns the engine.

HTTP handlers never touch the engine directly while it steps: `add` and `abort` queue commands that
the loop applies between steps; `engine.step()` runs in a worker thread so the event loop keeps
serving (and noticing disconnects) during a step. Each request's RequestOutputs arrive on an
asyncio.Queue (several requests may share one: a completion with a list of prompts).

What a request can break stays with that request: a command that raises fails its request alone, a
step that raises for one row fails that row's request (serve/engine.py) and a step that raises
anywhere else fails the requests it was running; every such failure is logged and reaches the client
as an output with `error` set. Should the loop itself die, `dead` says why, every waiting client gets
an error, `add` refuses with EngineDead, and `on_death` runs (the server makes the process exit
non-zero, so a supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor

from serve.engine import LLMEngine
from serve.latency import RequestTimer
from serve.outputs import RequestOutput, failure_message
from serve.sampling_params import SamplingParams

log = logging.getLogger("serve")


class EngineDead(RuntimeError):
    """The engine loop has died; no request can be served until the process restarts."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_death=None):
        self.engine = engine
        self.on_death = on_death        # called with the exception that killed the loop
        self.dead: BaseException | None = None
        self.queues: dict[str, asyncio.Queue] = {}
        self.timers: dict[str, RequestTimer] = {}
        self._commands: list = []       # (request id, callable)
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._ids = itertools.count()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def add(self, prompt_ids: list[int], params: SamplingParams, prefix: str = "req",
            queue: asyncio.Queue | None = None) -> tuple[str, asyncio.Queue]:
        """Validate now (ValueError for the caller), enqueue; outputs arrive on the returned queue."""
        if self.dead is not None:
            raise EngineDead(f"the engine has died ({type(self.dead).__name__})")
        self.engine.check_request(prompt_ids, params)
        request_id = f"{prefix}-{next(self._ids)}"
        queue = queue if queue is not None else asyncio.Queue()
        self.queues[request_id] = queue
        self.timers[request_id] = RequestTimer()
        self._command(request_id, lambda: self.engine.add_request(prompt_ids, params, request_id))
        return request_id, queue

    def abort(self, request_id: str) -> None:
        self.timers.pop(request_id, None)
        if self.queues.pop(request_id, None) is not None:
            self._command(request_id, lambda: self.engine.abort_request(request_id))

    def _command(self, request_id: str, command) -> None:
        self._commands.append((request_id, command))
        self._wake.set()

    def _apply_commands(self) -> None:
        commands, self._commands = self._commands, []
        for request_id, command in commands:
            try:
                command()
            except Exception as err:
                log.exception("request %s: a command for it failed", request_id)
                if request_id in self.queues:       # an add (an abort has no one left to tell)
                    self.engine.metrics.failed += 1
                    self._deliver([_error_output(request_id, err)])

    async def _loop(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except BaseException as err:
            self._die(err)

    async def _run(self) -> None:
        while True:
            self._apply_commands()
            if not self.engine.has_unfinished_requests():
                self._wake.clear()
                await self._wake.wait()
                continue
            self._deliver(await self._step())

    async def _step(self) -> list[RequestOutput]:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self.engine.step)
        except Exception as err:
            log.exception("an engine step failed; failing the requests it was running")
            return self.engine.fail_running(err)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            queue = self.queues.get(output.request_id)
            if queue is None:
                continue
            queue.put_nowait(output)
            self.timers[output.request_id].observe(output, self.engine.metrics.latency)
            if output.finished:
                del self.queues[output.request_id], self.timers[output.request_id]

    def _die(self, err: BaseException) -> None:
        log.critical("the engine loop died; failing every request", exc_info=err)
        self.dead = err
        for request_id, queue in self.queues.items():
            queue.put_nowait(_error_output(request_id, err))
        self.queues.clear()
        if self.on_death is not None:
            self.on_death(err)


def _error_output(request_id: str, err: BaseException) -> RequestOutput:
    return RequestOutput(request_id, [], [], True, error=failure_message(err))
