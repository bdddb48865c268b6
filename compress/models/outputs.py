"""Output directories that are written completely or not at all.

Every command that writes a model writes it into a temporary sibling directory and renames it onto
the target only when everything is on disk, so an interrupted or failed run never leaves a
half-written model and never destroys an existing one. The temporary directory's name carries the
pid of the run that writes it (`.NAME.tmp-PID-XXXX`); a run killed before it could clean up leaves it
behind, and the next run of the same output removes it once that process is gone (names without a
pid, from before, count as gone).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from compress.errors import UserError


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early (before any work) if `path` exists and `overwrite` is off."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"output directory {path} already exists; pass --overwrite to replace it")
    if path.exists() and not path.is_dir():
        raise UserError(f"output path {path} exists and is not a directory")
    return path


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` when the block exits without error."""
    path = check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp_dirs(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
    tmp.rename(path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_tmp_dirs(path: Path) -> list[Path]:
    """Remove the temporary (and set-aside old) directories of `path` whose writing process is dead."""
    removed = []
    for kind in ("tmp", "old"):
        for stale in path.parent.glob(f".{path.name}.{kind}-*"):
            pid = stale.name[len(f".{path.name}.{kind}-"):].split("-")[0]
            if stale.is_dir() and not (pid.isdigit() and _alive(int(pid))):
                shutil.rmtree(stale, ignore_errors=True)
                removed.append(stale)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # someone else's process
        return True
    return True
