"""The code a stage runs, found statically, and its hash: what DVC and the checkpoint keys see of the code.

A stage's closure is every project source file reachable by imports from its entry modules (imports inside
functions count: a lazy import still runs), with each package's ``__init__`` on the way, plus the parts of the
configured task it uses and the modules of the configured rewards (the task and reward registries import by
name, which no static scan can see). A reward from outside the project counts by its file's hash (``module:Class``)
or its distribution's version (an entry point). Editing a
file outside a stage's closure cannot change what the stage writes, so it never reruns the stage.
"""

from __future__ import annotations

import ast
import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

from gdro_core.params import Params
from gdro_core.stages import STAGE_ENTRY, stage

SOURCE_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gdro_core", "flows")

DISPATCHERS = frozenset({"flows.cli"})
"""Modules whose function-level imports belong to other commands: only their module-level imports count."""


def module_file(name: str, root: Path = SOURCE_ROOT) -> Path | None:
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def _imports(path: Path, mtime_ns: int, top_level_only: bool) -> frozenset[str]:
    names: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return frozenset(n for n in names if n.split(".")[0] in PACKAGES)


def imported_names(path: Path, top_level_only: bool = False) -> frozenset[str]:
    """Project modules (and ``module.name`` candidates) that ``path`` imports."""
    return _imports(path, path.stat().st_mtime_ns, top_level_only)


def closure(modules: tuple[str, ...] | list[str], root: Path = SOURCE_ROOT,
            top_level_only: frozenset[str] = DISPATCHERS) -> set[Path]:
    """Source files reachable from ``modules``, with each package's ``__init__`` on the way."""
    todo, seen = list(modules), set()
    files: set[Path] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        f = module_file(name, root)
        if f is None:
            continue
        files.add(f)
        todo += sorted(imported_names(f, top_level_only=name in top_level_only))
    return files


def files_hash(files: set[Path] | list[Path], root: Path = SOURCE_ROOT) -> str:
    """sha256 over the files' names relative to ``root`` and their contents, in sorted order."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        h.update(f.read_bytes() if f.is_file() else b"<missing>")
        h.update(b"\0")
    return h.hexdigest()


def task_modules(task: str, parts: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The task package's part modules a stage runs, and its task class module (whose method-level imports are
    the parts, so only its module-level imports count)."""
    from gdro_core.tasks.registry import task_package

    package = task_package(task)
    return tuple(f"{package}.{p}" for p in parts), (f"{package}.task",)


REWARD_SEAM = ("gdro_core.rewards.registry", "gdro_core.rewards.weighted")


def stage_files(name: str, params: Params, root: Path = SOURCE_ROOT) -> set[Path]:
    """Every project source file stage ``name`` runs with these params (the configured task's parts and rewards
    only)."""
    s = stage(name)
    modules: tuple[str, ...] = STAGE_ENTRY + s.code
    top_level: tuple[str, ...] = ()
    if s.task_parts:
        parts, top_level = task_modules(params.task, s.task_parts)
        modules += parts + top_level
    if "reward" in s.task_parts:
        from gdro_core.rewards.registry import reward_sources

        modules += REWARD_SEAM + tuple(reward_sources(params)[0])
    return closure(modules, root, DISPATCHERS | frozenset(top_level))


def external_code(name: str, params: Params) -> list[dict[str, str]]:
    """The configured rewards from outside the project that stage ``name`` runs, by file hash or version."""
    if "reward" not in stage(name).task_parts:
        return []
    from gdro_core.rewards.registry import reward_sources

    return reward_sources(params)[1]


def stage_code_hash(name: str, params: Params, root: Path = SOURCE_ROOT) -> str:
    return code_record(name, params, root)["sha256"]


def code_record(name: str, params: Params, root: Path = SOURCE_ROOT) -> dict[str, Any]:
    """What ``gdro check`` writes for a stage: DVC reruns the stage exactly when this changes."""
    files = stage_files(name, params, root)
    digest = files_hash(files, root)
    external = external_code(name, params)
    record: dict[str, Any] = {"stage": name, "files": sorted(str(f.relative_to(root)) for f in files)}
    if external:
        digest = hashlib.sha256((digest + json.dumps(external, sort_keys=True)).encode()).hexdigest()
        record["external"] = external
    return {"stage": name, "sha256": digest, **record}
