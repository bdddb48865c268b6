"""evals/peers/: wheels cut into chunks and put back byte for byte; any damage is named, never installed."""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "evals" / "peers"))

from chunks import MANIFEST, ManifestError, reassemble, split


@pytest.fixture
def wheels(tmp_path) -> list[Path]:
    """Random files whose sizes straddle the chunk size (one empty, one spanning three chunks)."""
    rng = random.Random(3)
    folder = tmp_path / "wheels"
    folder.mkdir()
    paths = []
    for i, size in enumerate([1000, 0, 4096, 9000, 17]):
        paths.append(folder / f"pkg{i}-1.0-py3-none-any.whl")
        paths[-1].write_bytes(rng.randbytes(size))
    return paths


def test_split_then_reassemble_is_byte_exact(wheels, tmp_path):
    stage = tmp_path / "stage"
    manifest = split(wheels, stage, chunk_size=4096)
    assert [c["size"] for c in manifest["chunks"]] == [4096, 4096, 4096, 1825]
    assert all((stage / c["name"]).stat().st_size <= 4096 for c in manifest["chunks"])
    out = reassemble(stage, tmp_path / "out")
    assert [p.name for p in out] == [w.name for w in wheels]
    for original, rebuilt in zip(wheels, out):
        assert hashlib.sha256(rebuilt.read_bytes()).digest() == hashlib.sha256(original.read_bytes()).digest()


def test_a_flipped_byte_in_a_chunk_is_named(wheels, tmp_path):
    stage = tmp_path / "stage"
    split(wheels, stage, chunk_size=4096)
    data = bytearray((stage / "chunk.02").read_bytes())
    data[100] ^= 0xFF
    (stage / "chunk.02").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="chunk.02: sha256 differs"):
        reassemble(stage, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_and_truncated_chunks_are_named(wheels, tmp_path):
    stage = tmp_path / "stage"
    split(wheels, stage, chunk_size=4096)
    (stage / "chunk.01").unlink()
    (stage / "chunk.03").unlink()
    with pytest.raises(ManifestError, match=r"missing 2 of 4 chunks: chunk.01, chunk.03"):
        reassemble(stage, tmp_path / "out")
    split(wheels, stage, chunk_size=4096)
    (stage / "chunk.03").write_bytes((stage / "chunk.03").read_bytes()[:-1])
    with pytest.raises(ManifestError, match="chunk.03: 1,824 bytes, the manifest says 1,825"):
        reassemble(stage, tmp_path / "out")


@pytest.mark.parametrize("damage, message", [
    (lambda m: "{not json", "not a chunk manifest"),
    (lambda m: json.dumps({k: v for k, v in m.items() if k != "chunks"}), "not a chunk manifest.*chunks"),
    (lambda m: json.dumps({**m, "total_size": m["total_size"] + 1}), "sizes do not add up"),
    (lambda m: json.dumps({**m, "files": [{**m["files"][0], "sha256": "abc"}] + m["files"][1:]}), "no valid sha256"),
])
def test_a_damaged_manifest_gives_a_clear_error(wheels, tmp_path, damage, message):
    stage = tmp_path / "stage"
    manifest = split(wheels, stage, chunk_size=4096)
    (stage / MANIFEST).write_text(damage(manifest))
    with pytest.raises(ManifestError, match=message):
        reassemble(stage, tmp_path / "out")


def test_a_wrong_file_hash_in_the_manifest_stops_after_reassembly(wheels, tmp_path):
    stage = tmp_path / "stage"
    manifest = split(wheels, stage, chunk_size=4096)
    manifest["files"][3]["sha256"] = "0" * 64
    (stage / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="pkg3-1.0-py3-none-any.whl: sha256 after reassembly differs"):
        reassemble(stage, tmp_path / "out")


def test_install_stage_step_copies_checked_chunks_and_lists_the_rest(wheels, tmp_path, capsys):
    import install
    carried, dest = tmp_path / "carried", tmp_path / "dest"
    split(wheels, carried, chunk_size=4096)
    for name in ("chunk.00", "chunk.02"):
        (carried / name).unlink()
    assert install.main(["stage", "--source", str(carried), "--stage", str(dest)]) == 0
    assert "missing: chunk.00, chunk.02" in capsys.readouterr().out
    assert install.main(["install", "--stage", str(dest), "--target", str(tmp_path / "site")]) == 1
    assert "staging failed:" in capsys.readouterr().err


def test_wheel_list_is_complete_and_fits_the_transfer():
    rows = json.loads((ROOT / "evals" / "peers" / "vllm_wheels.json").read_text())
    assert rows[0]["name"] == "vllm" and rows[0]["version"] == "0.26.0"
    assert rows[0]["sha256"] == "adb1e4c9b46d0dfdb094121ae5aad670a42412dd813ed4e5db069ed6a15006de"
    for row in rows:
        assert row["filename"].startswith(row["name"].replace("-", "_").lower() + "-" + row["version"] + "-") or \
            row["filename"].lower().startswith(row["name"] + "-" + row["version"] + "-"), row
        assert len(row["sha256"]) == 64 and row["size"] > 0 and row["needed_by"]
        assert row["filename"].endswith(".whl") and ("cp312" in row["filename"] or "abi3" in row["filename"]
                                                     or "py3-none-any" in row["filename"]), row
    assert len({r["name"] for r in rows}) == len(rows)


def test_unpack_puts_a_wheel_where_pip_would(tmp_path):
    import zipfile

    import install
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("demo/__init__.py", "VALUE = 7\n")
        archive.writestr("demo-1.0.data/platlib/demo_ext/__init__.py", "")
        archive.writestr("demo-1.0.dist-info/METADATA", "Name: demo\nVersion: 1.0\n")
    install.unpack(wheel, tmp_path / "site")
    assert (tmp_path / "site" / "demo" / "__init__.py").read_text() == "VALUE = 7\n"
    assert (tmp_path / "site" / "demo_ext" / "__init__.py").is_file()
    assert not list((tmp_path / "site").glob("*.data/*lib"))
