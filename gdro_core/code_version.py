"""Which code a stage runs, hashed: training checkpoints made by other code are never resumed.

The files are the stage's code deps in ``dvc.yaml`` (paths under ``gdro_core/`` and ``flows/``), so DVC's
"rerun this stage" and the checkpoint key change together; a test keeps those deps complete.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

CODE_DIRS = ("gdro_core", "flows")
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def stage_code_paths(stage: str, source_root: Path = SOURCE_ROOT) -> list[Path]:
    """The stage's code deps from ``dvc.yaml``; the whole library and flows when there is no dvc.yaml."""
    dvc_file = source_root / "dvc.yaml"
    if not dvc_file.is_file():
        return [source_root / d for d in CODE_DIRS]
    stages = yaml.safe_load(dvc_file.read_text()).get("stages", {})
    if stage not in stages:
        raise KeyError(f"dvc.yaml has no stage {stage!r}")
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stages[stage].get("deps", [])]
    return [source_root / d for d in deps if Path(d).parts[0] in CODE_DIRS]


def code_hash(stage: str, source_root: Path = SOURCE_ROOT) -> str:
    """sha256 over the stage's Python source files (relative names and contents)."""
    h = hashlib.sha256()
    files: set[Path] = set()
    for p in stage_code_paths(stage, source_root):
        files |= set(p.rglob("*.py")) if p.is_dir() else {p}
    for f in sorted(files):
        h.update(str(f.relative_to(source_root)).encode())
        h.update(f.read_bytes() if f.is_file() else b"<missing>")
    return h.hexdigest()
