"""Packaging: the distribution's package list matches the tree, the wheel carries kernels/ as
compress.kernels and not the evaluation scripts (they run from a checkout; the library never imports them), and nothing of ours takes the top-level import name `kernels`, which belongs to Hugging
Face's `kernels` distribution (transformers imports it whenever it is installed; a hard dependency from
transformers 5.25 on, when a kernels/__init__.py here broke `import transformers.modeling_utils` in every
process started in the repository root)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_package_list_covers_the_tree():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {name: REPO / path for name, path in config["package-dir"].items()}
    listed = {name: mapped.get(name, REPO / name.replace(".", "/")) for name in config["packages"]}
    on_disk = {path.parent for root in ("compress", "serve", "kernels")
               for path in (REPO / root).rglob("*.py") if "__pycache__" not in path.parts}
    assert on_disk == set(listed.values()), sorted(map(str, on_disk ^ set(listed.values())))
    assert mapped == {"compress.kernels": REPO / "kernels"}


def test_the_name_kernels_is_not_ours_in_the_repo_root():
    """From the repository root (first on sys.path, as under `python -m pytest`), `kernels` must be
    Hugging Face's package or nothing (a namespace portion has no __file__), and transformers' modeling
    code must import."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    proc = run_python("import importlib.util as u; s = u.find_spec('kernels'); print(s and s.origin)\n"
                      "import transformers.modeling_utils\n"
                      "from compress import kernels; print(kernels.__path__[0])", cwd=REPO, pythonpath=str(REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    origin, path = proc.stdout.split()
    assert not origin.startswith(str(REPO / "kernels")), origin
    assert path == str(REPO / "kernels")


def test_the_wheel_installs_kernels_as_compress_kernels(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "src"  # pip builds in the source tree (a build/ directory): build a copy
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("compress", "serve", "kernels"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("compress-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"compress", "serve"}, tops
    kernel_modules = {p.name for p in (REPO / "kernels").glob("*.py")}
    assert {n.split("/")[-1] for n in names if n.startswith("compress/kernels/")} == kernel_modules
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # Outside the repository, with the unpacked wheel first on the path: the package resolves into it.
    proc = run_python("from compress import kernels; from compress.kernels import dispatch, decode\n"
                      "print(kernels.__path__[0]); print(decode.__file__)\n"
                      "dispatch.load_backend('reference'); import serve, transformers.modeling_utils",
                      cwd=tmp_path, pythonpath=str(site))
    assert proc.returncode == 0, proc.stderr[-2000:]
    path, decode_file = proc.stdout.split()
    assert path == str(site / "compress" / "kernels") and decode_file.startswith(path)
