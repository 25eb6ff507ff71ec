"""The identity of a base checkpoint: a content fingerprint of its weights, or its hub revision.

It is part of the data version (rollout fingerprint, ``data.base_fingerprint`` tags), is written beside
every saved adapter (``base.json``) and is recorded by registered models, which refuse another base.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import torch

from gdro_core.data.store import sha256_file
from gdro_core.models.base import ModelError

CONTENT = (".safetensors", ".json", ".txt", ".model")
"""Files that make a checkpoint: weights, configs, tokenizer files."""


@lru_cache(maxsize=64)
def _dir_fingerprint(path: str, stats: tuple) -> str:
    h = hashlib.sha256()
    for rel, *_ in stats:
        h.update(f"{rel}\0{sha256_file(Path(path) / rel)}\n".encode())
    return "sha256:" + h.hexdigest()


def dir_fingerprint(path: Path) -> str:
    """sha256 over the checkpoint's weight, config and tokenizer files (relative path + content), hidden ones aside.

    Cached per process by (path, sizes, mtimes), so a large checkpoint is hashed once per process.
    """
    path = Path(path).resolve()
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and p.suffix in CONTENT and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    stats = tuple((p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _dir_fingerprint(str(path), stats)


def hub_revision(repo_id: str) -> str:
    """The cached snapshot's commit of a hub id (nothing is downloaded)."""
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(repo_id, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any lookup failure means: not in the local cache
        raise ModelError(f"{repo_id!r} is neither a local directory nor a hub id in the local cache ({err})") from None
    return "hf:" + Path(snapshot).name


def base_fingerprint(source: str, base_dir: Path | None = None) -> str:
    """The base's identity: content fingerprint of the built-in base (``base_dir``) or of a local checkpoint,
    else the hub revision of a cached hub id."""
    if source == "builtin":
        if base_dir is None or not Path(base_dir).is_dir():
            raise ModelError(f"no built-in base model at {base_dir}: run `gdro base` first")
        return dir_fingerprint(Path(base_dir))
    if Path(source).is_dir():
        return dir_fingerprint(Path(source))
    return hub_revision(source)


def state_fingerprint(modules: dict[str, torch.nn.Module]) -> str:
    """sha256 over in-memory weights (a model that was never saved)."""
    h = hashlib.sha256()
    for name, module in sorted(modules.items()):
        for key, value in sorted(module.state_dict().items()):
            h.update(f"{name}.{key}".encode())
            h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()
