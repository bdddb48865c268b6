"""Files split into fixed-size chunks for a link that carries one chunk per transfer, and put back.

The files are laid end to end in one stream (in manifest order) and the stream is cut every
`chunk_size` bytes, so a chunk may hold the tail of one file and the head of the next. The manifest
(JSON) is the only record of the cut: per file its name, size, offset in the stream and sha256, and
per chunk its name, size and sha256. Everything is checked twice: each chunk when it arrives
(`verify_chunk`), each file after reassembly. Standard library only: the receiving side has nothing
else to install with.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"
_BUF = 1 << 20


class ManifestError(ValueError):
    """The manifest, a chunk or a reassembled file does not match what was recorded."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BUF):
            digest.update(block)
    return digest.hexdigest()


def split(files: list[Path], out_dir: Path, chunk_size: int) -> dict:
    """Write `files` as chunk.00, chunk.01, ... of at most `chunk_size` bytes, plus manifest.json."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("chunk.*"):
        old.unlink()
    entries, offset = [], 0
    for path in files:
        size = path.stat().st_size
        entries.append({"name": path.name, "size": size, "offset": offset, "sha256": sha256_file(path)})
        offset += size
    chunks = _write_chunks(files, out_dir, chunk_size)
    manifest = {"chunk_size": chunk_size, "total_size": offset, "files": entries, "chunks": chunks}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _stream(paths: list[Path]):
    """The files' bytes end to end, in blocks (never an empty one)."""
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(_BUF):
                yield block


def _write_chunks(files: list[Path], out_dir: Path, chunk_size: int) -> list[dict]:
    """Cut the files' stream into chunks of `chunk_size` bytes (the last one shorter)."""
    chunks, blocks = [], _stream(files)
    block = next(blocks, b"")
    while block:
        name, size, digest = f"chunk.{len(chunks):02d}", 0, hashlib.sha256()
        with open(out_dir / name, "wb") as out:
            while block and size < chunk_size:
                part, block = block[:chunk_size - size], block[chunk_size - size:]
                out.write(part)
                digest.update(part)
                size += len(part)
                block = block or next(blocks, b"")
        chunks.append({"name": name, "size": size, "sha256": digest.hexdigest()})
    return chunks


def load_manifest(path: Path) -> dict:
    """The manifest, checked for shape and for sizes that add up; ManifestError says what is wrong."""
    try:
        manifest = json.loads(Path(path).read_text())
        files, chunks, total = manifest["files"], manifest["chunks"], manifest["total_size"]
        file_sizes = [int(f["size"]) for f in files]
        chunk_sizes = [int(c["size"]) for c in chunks]
        for entry in files + chunks:
            if len(entry["sha256"]) != 64 or not entry["name"]:
                raise ManifestError(f"entry {entry.get('name')!r} has no valid sha256")
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest (carry {MANIFEST} with the chunks)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        if isinstance(err, ManifestError):
            raise ManifestError(f"{path}: {err}") from None
        raise ManifestError(f"{path}: not a chunk manifest ({type(err).__name__}: {err})") from None
    if sum(file_sizes) != total or sum(chunk_sizes) != total:
        raise ManifestError(f"{path}: sizes do not add up (files {sum(file_sizes):,} B, chunks "
                            f"{sum(chunk_sizes):,} B, total {total:,} B)")
    return manifest


def verify_chunk(path: Path, entry: dict) -> None:
    size = path.stat().st_size
    if size != entry["size"]:
        raise ManifestError(f"{path.name}: {size:,} bytes, the manifest says {entry['size']:,}")
    if sha256_file(path) != entry["sha256"]:
        raise ManifestError(f"{path.name}: sha256 differs from the manifest's")


def missing_chunks(manifest: dict, stage: Path) -> list[str]:
    return [c["name"] for c in manifest["chunks"] if not (stage / c["name"]).is_file()]


def reassemble(stage: Path, out_dir: Path) -> list[Path]:
    """Check every chunk in `stage`, rebuild the files into `out_dir`, check each; returns their paths."""
    manifest = load_manifest(stage / MANIFEST)
    missing = missing_chunks(manifest, stage)
    if missing:
        raise ManifestError(f"{stage}: missing {len(missing)} of {len(manifest['chunks'])} chunks: {', '.join(missing)}")
    for entry in manifest["chunks"]:
        verify_chunk(stage / entry["name"], entry)
    out_dir.mkdir(parents=True, exist_ok=True)
    blocks, leftover = _stream([stage / c["name"] for c in manifest["chunks"]]), b""
    paths = []
    for entry in manifest["files"]:
        paths.append(out_dir / entry["name"])
        with open(paths[-1], "wb") as out:
            size = entry["size"]
            while size:
                leftover = leftover or next(blocks)
                part, leftover = leftover[:size], leftover[size:]
                out.write(part)
                size -= len(part)
        if sha256_file(paths[-1]) != entry["sha256"]:
            raise ManifestError(f"{entry['name']}: sha256 after reassembly differs from the manifest's")
    return paths
