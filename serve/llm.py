"""The offline API: `LLM(path).generate(prompts, SamplingParams(...))` over one LLMEngine; with
`draft=DIR` (and `num_speculative_tokens`), speculative decoding (serve/speculative/)."""

from __future__ import annotations

import logging

from serve.config import EngineConfig
from serve.engine import LLMEngine
from serve.outputs import RequestOutput
from serve.sampling_params import SamplingParams

log = logging.getLogger("serve")


class LLM:
    """Offline batch generation: `LLM(path).generate(prompts, SamplingParams(...))`."""

    def __init__(self, model: str, **config):
        self.engine = LLMEngine(EngineConfig(model=str(model), **config))
        self.engine.stream_outputs = False

    def close(self) -> None:
        self.engine.close()

    def generate(self, prompts, params: SamplingParams | None = None) -> list[RequestOutput]:
        """prompts: a string, a token-id list, or a list of either; one RequestOutput each, in order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        ids = [self.engine.add_request(p, params) for p in prompts]
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.finished:
                    done[output.request_id] = output
        if self.engine.speculator is not None:
            log.info(self.engine.speculator.stats.summary())
        return [done[i] for i in ids]

    def summary(self) -> str:
        """Counters of the batches so far: tokens, steps, preemptions and, with a draft, speculation."""
        engine, m = self.engine, self.engine.metrics
        line = (f"{m.prompt_tokens} prompt and {m.generation_tokens} generated tokens in {m.num_steps} steps, "
                f"{engine.scheduler.num_preemptions} preemptions")
        return line if engine.speculator is None else f"{line}; {engine.speculator.stats.summary()}"
