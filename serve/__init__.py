"""Paged-KV serving runtime for dense and slimmed Gemma 2 / Gemma 3 models.

Offline: `from serve import LLM, SamplingParams; LLM(path).generate(prompts, SamplingParams(...))`.
Online: `compress serve DIR` (serve/server.py). Encoders of the BERT family (embeddings, classification):
`from serve import Encoder; Encoder(DIR).embed(texts)`, served by serve/encoder/. Data flow: engine.add_request -> scheduler.schedule ->
block_manager -> model_runner -> models/gemma.py -> attention backend -> sampler -> detokenizer.
"""

from serve.encoder import Encoder
from serve.engine import LLMEngine
from serve.llm import LLM
from serve.config import EngineConfig
from serve.outputs import CompletionOutput, RequestOutput
from serve.sampling_params import SamplingParams

__all__ = ["Encoder", "LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput"]
