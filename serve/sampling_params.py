"""Per-request sampling settings: their types and ranges, written once and checked by pydantic.

`SamplingFields` holds what the HTTP schemas (serve/protocol.py) take over field for field;
`SamplingParams` adds max_tokens and logprobs, whose API spelling differs between completions and chat,
and the checks across fields. A bad value raises pydantic's ValidationError (a ValueError), which the
offline API passes on and the server answers with 400.

Semantics follow the OpenAI API and vLLM's extensions: temperature 0 is greedy, top_p in (0, 1], top_k
0 or -1 disabled (larger than the vocabulary: disabled too), `n` independent samples sharing the
prompt's KV blocks, `stop` strings cut the text before the match, `stop_token_ids` end a sample like
EOS, `min_tokens` forbids EOS, stop tokens and stop strings until that many tokens are out, `logprobs`
asks for the sampled token's log-probability plus that many alternatives; `max_speculative_tokens`
caps the tokens a draft model proposes for the request per step (serve/speculative/). The penalties and
`logit_bias` are defined in serve/logits_processors.py. Integers are bounded where the device takes
them (int64 seeds: any 64-bit value, signed or not; int32 counts), floats must be finite.
"""

from __future__ import annotations

from functools import cached_property
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve.config import MAX_SPECULATIVE_TOKENS

INT32_MAX = 2**31 - 1
MAX_LOGIT_BIAS = 300        # entries, as OpenAI allows
MAX_STOP = 4                # stop strings, as OpenAI allows


def _finite(**bounds):
    return Field(allow_inf_nan=False, **bounds)


Count = Annotated[int, Field(ge=0, le=INT32_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]     # the engine checks it against the vocabulary
MaxTokens = Annotated[int, Field(ge=1, le=INT32_MAX)]
Logprobs = Annotated[int, Field(ge=0, le=20)]
Seed = Annotated[int, Field(ge=-2**63, le=2**64 - 1)]   # what torch.Generator.manual_seed takes
Penalty = Annotated[float, _finite(ge=-2.0, le=2.0)]


class SamplingFields(BaseModel):
    """The sampling fields a request names as they are (strict types: JSON true is not a number)."""
    model_config = ConfigDict(extra="forbid", strict=True)

    n: Annotated[int, Field(ge=1, le=1024)] = 1          # the engine's max_n is the real limit
    temperature: Annotated[float, _finite(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, _finite(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] = 0
    min_tokens: Count = 0
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] = Field(default_factory=list)
    stop_token_ids: Annotated[list[TokenId], Field(max_length=1024)] = Field(default_factory=list)
    ignore_eos: bool = False
    seed: Seed | None = None
    skip_special_tokens: bool = True
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: Annotated[float, _finite(gt=0.0, le=10.0)] = 1.0   # past 10 every seen token is out
    logit_bias: Annotated[dict[TokenId, Annotated[float, _finite(ge=-100.0, le=100.0)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None
    # With a draft model: at most this many drafted tokens per step for this request (0: none)
    max_speculative_tokens: Annotated[int, Field(ge=0, le=MAX_SPECULATIVE_TOKENS)] | None = None


class SamplingParams(SamplingFields):
    max_tokens: MaxTokens = 16
    logprobs: Logprobs | None = None

    @model_validator(mode="after")
    def _normalize(self) -> "SamplingParams":
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @cached_property     # read for every row of every step: computed once
    def uses_processors(self) -> bool:
        """Whether the logits need serve/logits_processors.py before sampling (not the fast path's argmax)."""
        return bool(self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty
                    or self.logit_bias or self.min_tokens)

    def sample_seed(self, sample_index: int) -> int | None:
        """Sample i of a seeded request draws from seed + i, wrapped into the 64 bits a generator takes."""
        return None if self.seed is None else (self.seed + sample_index) % 2**64
