"""Incremental detokenization that never emits a broken UTF-8 character.

Decoding token by token splits multi-byte characters (byte-level BPE) and loses SentencePiece's
leading spaces. Like vLLM, we decode a short window that ends at the new token and starts a few tokens
earlier (the "prefix"), emit only what extends the prefix's text, and hold back while the text ends in
U+FFFD (an incomplete character).
"""

from __future__ import annotations

_CONTEXT = 5   # prompt tokens decoded before the first output token, for correct leading spaces


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.num_added = 0

    def add_all(self, token_ids: list[int]) -> None:
        """The text of adding each token in turn, with two decodes (for callers that need only the end)."""
        if not token_ids:
            return
        self.ids += token_ids
        self.num_added += len(token_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:]).rstrip("\ufffd")
        if len(full_text) > len(prefix_text):
            self.text += full_text[len(prefix_text):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; returns the newly complete text (possibly empty)."""
        self.ids.append(token_id)
        self.num_added += 1
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        delta = full_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta
