"""Every project source file a module can import, found statically (imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gdro_core", "flows")


def module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_names(path: Path, top_level_only: bool = False) -> set[str]:
    names: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n.split(".")[0] in PACKAGES}


def closure(*modules: str) -> set[Path]:
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
        f = module_file(name)
        if f is None:
            continue
        files.add(f)
        todo += sorted(imported_names(f, top_level_only=name in DISPATCHERS))
    return files


DISPATCHERS = {"flows.cli"}
"""Modules whose function-level imports belong to other commands: only their module-level imports count."""

STAGE_ENTRY = ("flows.cli", "flows.context", "gdro_core.servers")
"""What every `gdro <stage>` command loads before the stage's own code (cli attaches to a running server)."""

STAGE_CODE = {
    "check": ("gdro_core.params", "gdro_core.data.store"),
    "train": ("flows.train", "gdro_core.training.launch"),
    "evaluate": ("flows.evaluate", "gdro_core.tracking.pyfunc_model"),  # registry logs it by file path
}


def stage_closure(stage: str) -> set[Path]:
    return closure(*STAGE_ENTRY, *STAGE_CODE.get(stage, (f"flows.{stage}",)))
