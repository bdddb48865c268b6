"""Download the wheels vLLM needs on the GPU machine (vllm_wheels.json), check them, and cut them into
chunks that one transfer to that machine can carry (run here, where PyPI is reachable).

Wheels go to `.stage/wheels/` (a cache: a wheel already there with the recorded sha256 is not fetched
again); chunks and their manifest to `.stage/vllm/`. Both folders are git-ignored. Each wheel is fetched
for the GPU machine's interpreter (CPython 3.12, manylinux x86_64), not for this one.

  python evals/peers/fetch.py                      # -> .stage/vllm/chunk.00 .. chunk.05 + manifest.json
  python evals/peers/fetch.py --chunk-mib 40
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chunks import ManifestError, sha256_file, split

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WHEELS = HERE / "vllm_wheels.json"
PLATFORMS = ("manylinux_2_31_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def pip_download_cmd(specs: list[str], dest: Path) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    return cmd + specs


def check_wheel(path: Path, row: dict) -> str | None:
    """None when `path` is the recorded wheel, else what differs."""
    if not path.is_file():
        return "not downloaded"
    if path.stat().st_size != row["size"]:
        return f"{path.stat().st_size:,} bytes, recorded {row['size']:,}"
    if sha256_file(path) != row["sha256"]:
        return "sha256 differs from the recorded one"
    return None


def fetch(rows: list[dict], dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    todo = [r for r in rows if check_wheel(dest / r["filename"], r) is not None]
    if todo:
        subprocess.run(pip_download_cmd([f"{r['name']}=={r['version']}" for r in todo], dest), check=True)
    bad = [(r["filename"], why) for r in rows if (why := check_wheel(dest / r["filename"], r))]
    if bad:
        raise ManifestError("; ".join(f"{name}: {why}" for name, why in bad))
    return [dest / r["filename"] for r in rows]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wheels", type=Path, default=WHEELS, help="the wheel list (JSON)")
    p.add_argument("--cache", type=Path, default=REPO / ".stage" / "wheels")
    p.add_argument("--out", type=Path, default=REPO / ".stage" / "vllm")
    p.add_argument("--chunk-mib", type=int, default=56,
                   help="chunk size; with the repository copy it must stay under what one transfer carries (64 MiB)")
    args = p.parse_args(argv)
    rows = json.loads(args.wheels.read_text())
    try:
        paths = fetch(rows, args.cache)
    except (ManifestError, subprocess.CalledProcessError) as err:
        print(f"fetch failed: {err}", file=sys.stderr)
        return 1
    manifest = split(paths, args.out, args.chunk_mib << 20)
    print(f"{len(paths)} wheels, {manifest['total_size'] / 1e6:.1f} MB -> {len(manifest['chunks'])} chunks in {args.out}")
    for chunk in manifest["chunks"]:
        print(f"  {chunk['name']}  {chunk['size']:>11,} B  {chunk['sha256'][:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
