"""Paged-KV serving runtime for dense and slimmed Gemma 2 / Gemma 3 models.

Offline: `from serve import LLM, SamplingParams; LLM(path).generate(prompts, SamplingParams(...))`.
Online: `compress serve DIR` (serve/server.py). Data flow: engine.add_request -> scheduler.schedule ->
block_manager -> model_runner -> models/gemma.py -> attention backend -> sampler -> detokenizer.
"""

from serve.engine import LLM, LLMEngine
from serve.config import EngineConfig
from serve.outputs import CompletionOutput, RequestOutput
from serve.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput"]
