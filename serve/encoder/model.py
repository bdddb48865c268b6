"""The model behind the encoder engine: what an encoder checkpoint can serve, and one batch through it.

Any checkpoint of the BERT family serves embeddings: its bare encoder's last hidden states pooled as
the directory says (compress.embeddings.pooling; mean pooling when it says nothing). A checkpoint with
a sequence-classification head also serves `classify`: the model's own logits (a question-answering
head serves embeddings only). A token-pruned
checkpoint (compress.token_pruning) runs its token-dropping forward for both: the logits read [CLS],
the embedding pools the tokens that survive the last layer. Weights are cast to the serving dtype
once; everything a caller gets back is float32 on the CPU. Shapes: a batch is `[B, S]`; `embed` gives
`[B, D]`, `classify` `[B, C]` (C = 1: a regression score).

Forwards run with cuDNN's attention left out of PyTorch's SDPA choices (SDPA_BACKENDS): cuDNN builds an
execution graph for each input shape it has not met (cached by shape), and a server's token-budget batches,
like the layers of a token-pruned model, meet new shapes all the time; flash, memory-efficient and math
attention set nothing up per shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from compress.embeddings.model import Embedder, max_length, model_inputs
from compress.embeddings.pooling import read_pooling

ENCODER_TYPES = ("bert", "roberta", "distilbert", "mpnet")
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def is_encoder(path: str | Path) -> bool:
    """Whether the directory holds a model of the BERT family (by config.json's model_type)."""
    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") in ENCODER_TYPES
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


class EncoderModel:
    """Loads `path` onto `device` in `dtype`; `embed(batch)` and, with a head, `classify(batch)`."""

    def __init__(self, path: str | Path, device: torch.device, dtype: torch.dtype):
        import compress
        from compress import token_pruning
        from compress.models.checkpoint import CLASSIFIER_ARCH_SUFFIX, load_tokenizer

        self.path, self.device = Path(path), device
        self.token_pruned = token_pruning.is_token_pruned(path)
        self.model = compress.load(path).to(device, dtype).eval()
        hf = self.model.model if self.token_pruned else self.model
        self.config, self.tokenizer, self.pooling = hf.config, load_tokenizer(path), read_pooling(path)
        self.has_head = any(a.endswith(CLASSIFIER_ARCH_SUFFIX) for a in hf.config.architectures or [])
        self.embedder = None if self.token_pruned else Embedder(hf.base_model, self.pooling)

    @property
    def num_labels(self) -> int | None:
        return self.config.num_labels if self.has_head else None

    @property
    def labels(self) -> list[str]:
        return [self.config.id2label[i] for i in range(self.config.num_labels)]

    @property
    def hidden_size(self) -> int:
        return getattr(self.config, "hidden_size", None) or self.config.dim

    def max_length(self) -> int:
        return max_length(self.config, self.pooling)

    @torch.inference_mode()
    def embed(self, batch: dict) -> torch.Tensor:
        with sdpa_kernel(SDPA_BACKENDS):
            if self.token_pruned:
                hidden, kept, *_ = self.model.hidden_states(**model_inputs(batch))
                return self.pooling.pool(hidden, kept).cpu()
            return self.embedder(**model_inputs(batch)).cpu()

    @torch.inference_mode()
    def classify(self, batch: dict) -> torch.Tensor:
        with sdpa_kernel(SDPA_BACKENDS):
            return self.model(**model_inputs(batch)).logits.float().cpu()
