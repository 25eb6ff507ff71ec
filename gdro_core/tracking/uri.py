"""Where the tracking store is: ``tracking.uri`` resolved against the project root, without importing MLflow
(``gdro check`` looks for a deleted store before any stage runs)."""

from __future__ import annotations

from pathlib import Path


def tracking_uri(uri: str, root: Path) -> str:
    """Relative ``sqlite:///x.db`` URIs are taken relative to the project root."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str((root / uri[len(prefix) :]).resolve())
    return uri
