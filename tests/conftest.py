"""Shared pytest configuration: data location, markers, and deterministic CPU threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """The real-data directory: $COMPRESS_DATA_DIR, else <repo>/../shared/data, else None."""
    candidates = [os.environ.get("COMPRESS_DATA_DIR"), REPO.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and Path(candidate, "glue").is_dir():
            return Path(candidate)
    return None


@pytest.fixture
def data_dir() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("real data not found: set COMPRESS_DATA_DIR or place shared/data beside the repo")
    return path


@pytest.fixture
def compile_env() -> dict:
    """The environment of a subprocess that compiles kernels for the H100 on this machine (no interpreter,
    this checkout importable); run it with cwd=REPO where it imports evals/ modules."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _kernel_options():
    """Every test ends with the kernel options (kernels/options.py) it started with."""
    from compress.kernels import using_options
    with using_options():
        yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
