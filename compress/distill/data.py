"""Token windows for distillation: the training text cut into windows, held-out windows from its end, and
text the teacher samples itself when the text runs short.

Windows are `[N, L]` int64, BOS then L-1 tokens of running text (as in calibration, compress.data.calib),
here consecutive and non-overlapping. The last `eval_windows` windows of the text are held out (the
perplexity and KL reported during training); the rest train. When the text has fewer training windows than
the run reads, the teacher samples more from BOS (temperature 1, top-k 50; `--no-sample` turns it off), at
most as many as the text gave, and the windows repeat in epochs past that. Step s reads positions
[s*B, (s+1)*B) of the sequence formed by one seeded permutation per epoch, so what a step reads is a function
of (seed, step) alone and a resumed run reads what the uninterrupted run would have.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from compress.errors import UserError

SAMPLE_BATCH = {"cuda": 256, "cpu": 8}  # sequences per `generate` call when the teacher samples


@dataclass
class Windows:
    train: torch.Tensor  # [N, L]
    heldout: torch.Tensor  # [E, L]
    source: str
    num_sampled: int  # of the training windows, how many the teacher sampled

    def batch(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        """`[batch_size, L]`: the windows step `step` trains on."""
        n = len(self.train)
        positions = range(step * batch_size, (step + 1) * batch_size)
        return self.train[[int(_permutation(n, seed, p // n)[p % n]) for p in positions]]

    def sampled(self) -> torch.Tensor | None:
        """The teacher's windows (int32, for the training state), or None."""
        return self.train[len(self.train) - self.num_sampled:].int() if self.num_sampled else None


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def text_windows(tokenizer, config) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """(training windows, held-out windows, source) of the text `config` names, None if it names none;
    a UserError when the text is empty or too short (checked before any model is loaded)."""
    from compress.data.calib import bos_token_id, calibration_documents, token_stream
    from compress.data.perplexity import make_windows

    found = calibration_documents(config.calib, config.data_dir)
    if found is None:
        return None
    docs, source = found
    stream, length, held = token_stream(tokenizer, docs), config.seq_len, config.eval_windows
    if len(stream) // (length - 1) < held + 1:
        raise UserError(f"training text ({source}) has {len(stream)} tokens, fewer than {held + 1} windows of "
                        f"{length} ({held} held out): give more text, or lower --seq-len or --eval-windows")
    rows = make_windows(stream, bos_token_id(tokenizer), length, None)
    return rows[:-held], rows[-held:], source


def distill_windows(teacher, tokenizer, config, text, sampled: torch.Tensor | None = None) -> Windows:
    """Training and held-out windows for `config` (compress.distill.config.DistillConfig) from `text` (what
    `text_windows` gave); `sampled`: the teacher's windows of an earlier part of the run, not sampled again."""
    from compress.data.calib import bos_token_id

    bos, length, held = bos_token_id(tokenizer), config.seq_len, config.eval_windows
    need = config.num_steps * config.batch_size
    if text is None:
        if not config.sample:
            raise UserError("no training text: give --calib (or --data-dir with the Wikipedia sample), or allow "
                            "the teacher to sample text (drop --no-sample)")
        ids = _sample(teacher, bos, need + held, length, config.seed, sampled)
        return Windows(ids[held:], ids[:held], "text sampled from the teacher (no --calib and no local text)", need)
    train, heldout, source = text
    extra = min(need - len(train), len(train)) if config.sample else 0
    if extra > 0:
        ids = _sample(teacher, bos, extra, length, config.seed, sampled)
        return Windows(torch.cat([train, ids]), heldout, f"{source}, and text sampled from the teacher", extra)
    return Windows(train, heldout, source, 0)


def _sample(teacher, bos: int, count: int, seq_len: int, seed: int, earlier=None) -> torch.Tensor:
    from compress.data.calib import sample_from_model

    if earlier is not None:
        return earlier.long()
    device = next(teacher.parameters()).device
    return sample_from_model(teacher, bos, count, seq_len, seed, SAMPLE_BATCH[device.type],
                             desc="teacher samples training text").cpu()
