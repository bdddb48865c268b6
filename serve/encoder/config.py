"""The settings of the encoder engine (`compress serve` on an encoder maps its flags onto these fields)."""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class EncoderConfig:
    model: str = ""
    device: str = "auto"
    dtype: str = "auto"  # auto: float16 on CUDA (what text-embeddings-inference runs BERT in), float32 elsewhere
    max_num_batched_tokens: int = 16384  # padded tokens of one forward (text-embeddings-inference's default)
    max_num_inputs: int = 2048  # inputs of one request (OpenAI's limit for embeddings)
    max_model_len: int | None = None  # tokens of one input, special tokens included; None: the model's

    def validate(self) -> "EncoderConfig":
        if not self.model:
            raise ValueError("no model given")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("max_num_batched_tokens", "max_num_inputs", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        return self
