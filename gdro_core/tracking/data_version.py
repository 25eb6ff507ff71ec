"""The data version a model was trained on: DVC's own content hashes of its inputs.

The hashes are computed with ``dvc_data`` exactly as ``dvc add`` / ``dvc.lock`` record them (``<md5>`` for
a file, ``<md5>.dir`` for a directory), so a registered adapter can be matched to the DVC-tracked data
(``dvc.lock``, ``dvc exp show``) it came from, whether or not it was trained through ``dvc repro``.
"""

from __future__ import annotations

from pathlib import Path

from gdro_core.layout import Layout
from gdro_core.data.store import read_json
from gdro_core.models.base import ModelError
from gdro_core.models.identity import base_fingerprint


def dvc_md5(path: Path) -> str:
    """DVC's md5 of a file or directory (as in ``dvc.lock``); '' when it does not exist."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs import LocalFileSystem, MemoryFileSystem

    path = Path(path)
    if not path.exists():
        return ""
    odb = HashFileDB(MemoryFileSystem(), "memory://gdro-data-version")
    _, _, obj = build(odb, str(path.resolve()), LocalFileSystem(), "md5")
    return str(obj.hash_info.value)


def _base_fingerprint(lay: Layout) -> str:
    """The base checkpoint's fingerprint; '' when it cannot be found (as :func:`dvc_md5` for a missing path)."""
    try:
        return base_fingerprint(lay.params.model.source, lay.base_dir)
    except ModelError:
        return ""


def data_version(lay: Layout) -> dict[str, str]:
    """``data.*`` tags: DVC hashes of prompts, rollouts, reward table and base model, the base checkpoint's
    fingerprint (weights content hash or hub revision) and the rollout fingerprint."""
    manifest = lay.rollout_dir / "manifest.json"
    return {
        "data.prompts": dvc_md5(lay.prompts_dir),
        "data.rollouts": dvc_md5(lay.rollout_dir),
        "data.rewards": dvc_md5(lay.rewards),
        "data.base": dvc_md5(lay.base_dir),
        "data.base_fingerprint": _base_fingerprint(lay),
        "data.rollout_fingerprint": read_json(manifest)["fingerprint"] if manifest.is_file() else "",
    }
