"""Output directories that are written completely or not at all.

Every command that writes a model writes it into a temporary sibling directory and renames it onto
the target only when everything is on disk, so an interrupted or failed run never leaves a
half-written model and never destroys an existing one.
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
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
