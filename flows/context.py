"""Loads params once per flow run and resolves the project layout."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gdro_core.layout import Layout
from gdro_core.params import load_params


def project_root() -> Path:
    """The project root: ``GDRO_ROOT`` if set, else the working directory (where dvc runs stages)."""
    return Path(os.environ.get("GDRO_ROOT", Path.cwd())).resolve()


def load_layout(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None) -> Layout:
    root = project_root()
    path = Path(params_path)
    # no global seeding: every draw takes an explicit generator, so parallel sweep threads do not interleave
    return Layout(root=root, params=load_params(path if path.is_absolute() else root / path, overrides))
