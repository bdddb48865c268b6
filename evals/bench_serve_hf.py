"""Hugging Face baselines of the serving benchmark, on the same prompts and output length.

- `generate_batch`: transformers' continuous batching (paged KV, attn_implementation "paged|sdpa").
- padded `generate`: left-padded batches of 64, SDPA attention; min_new_tokens = max_new_tokens so every
  request produces exactly the asked-for tokens (EOS ignored, as in the engine's run).
Each returns the same record as the engine's offline run: seconds, requests, prompt and output tokens.
"""

from __future__ import annotations

import gc
import time

import torch


def _load(path, attn: str, device: str = "cuda"):
    """The model with `attn`, or its eager fallback where transformers refuses SDPA for the
    architecture (Gemma 2's soft-capping in some versions); returns (model, implementation used)."""
    from transformers import AutoModelForCausalLM
    for impl in (attn, attn.replace("sdpa", "eager")):
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=device,
                                                         attn_implementation=impl)
            return model.eval(), impl
        except ValueError:
            if impl != attn:
                raise
    raise AssertionError("unreachable")


def _free(model) -> None:
    del model
    gc.collect()
    torch.cuda.empty_cache()


def _record(name, seconds, prompts, output_tokens) -> dict:
    return {"name": name, "seconds": seconds, "requests": len(prompts),
            "prompt_tokens": sum(map(len, prompts)), "output_tokens": output_tokens}


def _count_generated(result) -> int:
    total = 0
    for out in (result.values() if isinstance(result, dict) else result):
        tokens = getattr(out, "generated_tokens", None)
        total += len(tokens) if tokens is not None else 0
    return total


def hf_generate_batch(path, prompts: list[list[int]], output_len: int) -> dict:
    from transformers import GenerationConfig
    model, impl = _load(path, "paged|sdpa")
    config = GenerationConfig(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                              eos_token_id=1, pad_token_id=0)
    model.generate_batch(inputs=prompts[:2], generation_config=GenerationConfig(
        max_new_tokens=4, do_sample=False, eos_token_id=1, pad_token_id=0))         # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = model.generate_batch(inputs=prompts, generation_config=config)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    _free(model)
    return _record(f"HF generate_batch ({impl})", seconds, prompts, _count_generated(result))


def _left_pad(batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, batch))
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, prompt in enumerate(batch):
        ids[i, width - len(prompt):] = torch.tensor(prompt)
        mask[i, width - len(prompt):] = 1
    return ids.cuda(), mask.cuda()


def hf_padded_generate(path, prompts: list[list[int]], output_len: int, batch_size: int = 64) -> dict:
    model, impl = _load(path, "sdpa")
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=1)
    ids, mask = _left_pad(prompts[:2])
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, **kw)          # warm-up
    torch.cuda.synchronize()
    start, produced = time.perf_counter(), 0
    for i in range(0, len(prompts), batch_size):
        ids, mask = _left_pad(prompts[i:i + batch_size])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=output_len,
                             min_new_tokens=output_len, **kw)
        produced += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    _free(model)
    return _record(f"HF generate (padded, batch {batch_size}, {impl})", seconds, prompts, produced)
