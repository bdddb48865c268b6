"""The architecture as the code states it: the library never imports the evaluation scripts, and the
modules of compress/ import each other without a cycle (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":  # kernels/ is the package compress.kernels (compress/kernels.py says why)
        parts = ["compress", *parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(path: Path, modules: set[str] = frozenset()) -> set[str]:
    """Every module named by an import statement in `path`, at any depth, relative imports resolved;
    `from pkg import name` names `pkg.name` where that is one of `modules`, else `pkg`."""
    tree, package = ast.parse(path.read_text()), module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return names


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def graph() -> dict[str, set[str]]:
    """compress module -> the compress modules it imports (a submodule's import implies its package's)."""
    files = {module_name(p): p for p in sources("compress", "kernels")}
    edges = {}
    for name, path in files.items():
        targets = {t for t in imported_names(path, set(files)) if t in files and t != name}
        edges[name] = targets
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


@pytest.mark.parametrize("folder", ["compress", "serve", "kernels"])
def test_library_never_imports_evals(folder):
    offenders = [str(p.relative_to(ROOT)) for p in sources(folder)
                 if any(n == "evals" or n.startswith("evals.") for n in imported_names(p))]
    assert offenders == []


def test_compress_has_no_import_cycle():
    assert find_cycle(graph()) is None


def test_cycle_finder_finds_a_planted_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_only_arch_knows_module_paths():
    """Module paths of the Hugging Face models (`.encoder.layer`, `.self_attn`, ...) appear in compress/arch/ alone."""
    paths = (".encoder.layer", ".self_attn.", ".attention.self", ".intermediate.dense", ".mlp.down_proj",
             ".model.layers", ".transformer.layer")
    offenders = [f"{p.relative_to(ROOT)}: {needle}" for p in sources("compress") if "arch" not in p.parts
                 for needle in paths if needle in p.read_text()]
    assert offenders == []


def test_no_tracked_file_holds_merge_conflict_markers():
    """A merge resolved in haste leaves `<<<<<<< ` / `>>>>>>> ` lines behind; none may be committed."""
    import subprocess

    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    found = []
    for name in tracked.splitlines():
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".sh", ".yaml", ".toml", ".txt"} or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if line.startswith(("<<<<<<< ", ">>>>>>> ")):
                found.append(f"{name}:{number}")
    assert not found, f"merge conflict markers at {found}"
