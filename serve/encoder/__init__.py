"""Serving BERT-family encoders (BERT, DistilBERT, RoBERTa, MPNet; dense, slimmed or token-pruned):
embeddings and classification.

Offline: `from serve import Encoder; Encoder(DIR).embed(["a text", ...])` (or `.classify`). Online:
`compress serve DIR` on an encoder checkpoint runs `server.build_app`. Data flow: HTTP -> protocol (parse,
validate) -> async_engine (requests of all clients pooled) -> engine (tokenize, token-budget batches from
batching.py) -> model (one padded batch through the encoder, pooled or classified) -> protocol (OpenAI or
vLLM response bodies).
"""

from serve.encoder.config import EncoderConfig
from serve.encoder.engine import Encoder
from serve.encoder.model import is_encoder

__all__ = ["Encoder", "EncoderConfig", "is_encoder"]
