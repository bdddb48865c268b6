"""Receive the chunks made by fetch.py on the GPU machine, put the wheels back together and install them
(run there, from the repository copy; standard library and pip only, no network).

  python3 evals/peers/install.py stage       # each call: copy the carried chunk(s) to /root/stage, check them
  python3 evals/peers/install.py install     # last call: reassemble, check, pip install --target, smoke check

`stage` copies whatever chunks the call carried (`.stage/vllm/`) into the staging folder, checking each
against the manifest, and says which are still missing. `install` checks every chunk and every
reassembled wheel, installs the wheels with `pip install --no-index --no-deps --target`, prints the
PYTHONPATH to use and imports vLLM with it: its version, then its compiled parts (the engine's ops and
vllm-flash-attn), each on one line.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chunks import (
    MANIFEST,
    ManifestError,
    load_manifest,
    missing_chunks,
    reassemble,
    verify_chunk,
)

REPO = Path(__file__).resolve().parents[2]
SMOKE = [
    "import vllm; print('vllm', vllm.__version__)",
    "from vllm import LLM, SamplingParams; import vllm.entrypoints.openai.api_server; print('imports ok')",
    "import vllm._C_stable_libtorch; print('vllm._C loaded')",
    "from vllm.vllm_flash_attn.flash_attn_interface import is_fa_version_supported as s; print('FA2', s(2), 'FA3', s(3))",
]


def stage(source: Path, dest: Path) -> list[str]:
    """Copy the manifest and the chunks present in `source` to `dest`, each checked; returns the missing."""
    dest.mkdir(parents=True, exist_ok=True)
    if (source / MANIFEST).is_file():
        shutil.copyfile(source / MANIFEST, dest / MANIFEST)
    manifest = load_manifest(dest / MANIFEST)
    for entry in manifest["chunks"]:
        if (source / entry["name"]).is_file():
            verify_chunk(source / entry["name"], entry)
            shutil.copyfile(source / entry["name"], dest / entry["name"])
            print(f"staged {entry['name']} ({entry['size']:,} B)")
    return missing_chunks(manifest, dest)


def pip_install(wheels: list[Path], target: Path) -> None:
    """`pip install --no-index --no-deps --target`; where this interpreter has no pip, the wheels are
    unpacked into `target` as pip would for pure and platform libraries (scripts are not needed here)."""
    if importlib.util.find_spec("pip") is None:
        print("no pip in this interpreter: unpacking the wheels")
        for wheel in wheels:
            unpack(wheel, target)
        return
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--upgrade", "--target", str(target)]
    subprocess.run(cmd + [str(w) for w in wheels], check=True)


def unpack(wheel: Path, target: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    for lib in target.glob("*.data/*lib"):              # NAME.data/purelib, NAME.data/platlib
        shutil.copytree(lib, target, dirs_exist_ok=True)
        shutil.rmtree(lib)


def smoke(target: Path) -> bool:
    env = {**os.environ, "PYTHONPATH": f"{target}:{os.environ.get('PYTHONPATH', '')}"}
    ok = True
    for code in SMOKE:
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             cwd="/", check=False)
        lines = (run.stdout or run.stderr).strip().splitlines()
        print(lines[-1] if lines else f"exit {run.returncode}" if run.returncode else "ok")
        ok &= run.returncode == 0
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["stage", "install"])
    p.add_argument("--source", type=Path, default=REPO / ".stage" / "vllm", help="where the carried chunks are")
    p.add_argument("--stage", type=Path, default=Path("/root/stage"), help="where chunks are gathered")
    p.add_argument("--target", type=Path, default=Path("/root/vllm-site"), help="where the wheels are installed")
    args = p.parse_args(argv)
    try:
        if args.step == "stage":
            missing = stage(args.source, args.stage)
            print(f"missing: {', '.join(missing)}" if missing else "all chunks staged: run `install`")
            return 0
        wheels = reassemble(args.stage, args.stage / "wheels")
    except ManifestError as err:
        print(f"staging failed: {err}", file=sys.stderr)
        return 1
    pip_install(wheels, args.target)
    print(f"PYTHONPATH={args.target}")
    return 0 if smoke(args.target) else 1


if __name__ == "__main__":
    sys.exit(main())
