"""The server's tokenizer work, off the event loop, with a bound checked before any of it.

Tokenizing, applying the chat template and decoding run in one worker thread (one: a Hugging Face
fast tokenizer must not be reconfigured from two threads at once), so a long prompt never stalls
/health or the other streams. Before that, a text longer than `max_chars` is refused without being
tokenized: no token covers more than `max_token_chars` characters (the longest vocabulary entry, plus
one for a space a decoder may put in front), so a text past max_model_len * max_token_chars characters
has more tokens than the context holds, and the answer (400) is exact, not a guess. That holds for
tokenizers whose normalizer never drops characters (Gemma's only replaces spaces; byte-level BPE has
none); one that deletes characters could see a prompt refused that would have fit.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from serve.protocol import ApiError


def max_token_chars(tokenizer) -> int:
    return max(len(token) for token in tokenizer.get_vocab()) + 1


class TextWorker:
    def __init__(self, tokenizer, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_chars = max_model_len * max_token_chars(tokenizer)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="text")

    async def run(self, fn, *args):
        """fn(*args) in the worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def check_length(self, num_chars: int, param: str) -> None:
        if num_chars > self.max_chars:
            raise ApiError(400, f"the {param} has {num_chars} characters, more than the {self.max_model_len} tokens "
                                f"of this model's context can hold", param)

    async def encode(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        self.check_length(len(prompt), "prompt")
        return await self.run(self._encode, prompt, add_special_tokens)

    async def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
        self.check_length(sum(len(m["content"]) for m in messages), "messages")
        return await self.run(self._encode_chat, messages, add_generation_prompt)

    async def decode(self, token_ids: list[int]) -> str:
        return await self.run(self.tokenizer.decode, token_ids)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def _encode_chat(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False)
        except Exception as err:  # jinja errors (a template that rejects a role) are the client's to fix
            raise ApiError(400, f"the chat template rejected the messages: {err}", "messages") from None
        return self._encode(text, add_special_tokens=False)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
