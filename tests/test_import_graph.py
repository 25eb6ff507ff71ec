"""The library's import graph, read statically (imports inside functions and under ``TYPE_CHECKING`` count):
no cycles, generic code that never reaches a task, a leaf params module, and tasks whose parts reach only
what they need, so that each stage's code closure is what it runs.

The scanner is checked on a small package written here, so each rule is shown to fail when broken.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

GENERIC = ("gdro_core.data", "gdro_core.evaluation", "gdro_core.training", "gdro_core.models", "gdro_core.objectives",
           "gdro_core.tracking", "gdro_core.params", "gdro_core.layout", "gdro_core.servers", "gdro_core.sweep")
"""Packages and modules that work with any task: they take a Task object and import none."""
TASK_ONLY = ("gdro_core.tasks.ocr", "gdro_core.tasks.geneval", "gdro_core.tasks.registry", "gdro_core.tasks.jobs")
PARTS = ("task", "prompts", "world", "reward", "judge")


# --- the scanner -------------------------------------------------------------------------------------------


class Graph:
    """Modules of the packages under ``root`` (by dotted name) and the project modules each one imports."""

    def __init__(self, root: Path, package: str = "gdro_core"):
        self.files: dict[str, Path] = {}
        for f in sorted((root / package).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            self.files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
        self.package = package
        self.edges = {m: self._imports(m) for m in self.files}

    def _resolve(self, name: str) -> str | None:
        """The module ``name`` names, or the package it is an attribute of."""
        while name and name not in self.files:
            name = name.rpartition(".")[0]
        return name or None

    def _imports(self, module: str) -> set[str]:
        path = self.files[module]
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out |= {self._resolve(a.name) for a in node.names if a.name.split(".")[0] == self.package}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                if base.split(".")[0] != self.package:
                    continue
                for a in node.names:  # `from pkg import mod` imports the module, `from mod import name` the module
                    out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in self.files else self._resolve(base))
        out.discard(None)
        out.discard(module)
        return out

    def top_level_imports(self, module: str) -> list[str]:
        """Names imported at module level outside ``if TYPE_CHECKING:`` (what importing the module runs)."""
        names = []
        for node in ast.parse(self.files[module].read_text()).body:
            if isinstance(node, ast.Import):
                names += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names.append(node.module or "")
        return names

    def closure(self, module: str) -> set[str]:
        """Every project module importing ``module`` can load, with each package ``__init__`` on the way."""
        seen: set[str] = set()
        todo = [module]
        while todo:
            m = todo.pop()
            if m in seen:
                continue
            seen.add(m)
            parts = m.split(".")
            todo += [p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in self.files]
            todo += self.edges.get(m, ())
        return seen

    def cycles(self) -> list[list[str]]:
        """Groups of modules that import each other (strongly connected components), each as one cycle's path.

        A package is not counted as importing its own submodules' parents: Python runs a package's ``__init__``
        before any of its modules, so only imports written in the code make edges.
        """
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        found: list[list[str]] = []

        def visit(v: str) -> None:
            index[v] = low[v] = len(index)
            stack.append(v)
            on_stack.add(v)
            for w in sorted(self.edges[v]):
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                group = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    group.append(w)
                    if w == v:
                        break
                if len(group) > 1:
                    found.append(self._path(sorted(group)))

        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 10 * len(self.files)))
        try:
            for v in sorted(self.files):
                if v not in index:
                    visit(v)
        finally:
            sys.setrecursionlimit(limit)
        return found

    def _path(self, group: list[str]) -> list[str]:
        """One cycle through the group's first module: a -> b -> ... -> a."""
        members, start = set(group), group[0]
        paths = {start: [start]}
        todo = [start]
        while todo:
            v = todo.pop(0)
            for w in sorted(self.edges[v] & members):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    todo.append(w)
        return group


@pytest.fixture(scope="module")
def graph() -> Graph:
    return Graph(ROOT)


def reached(graph: Graph, module: str, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in graph.closure(module) if m.startswith(prefixes))


# --- the rules ---------------------------------------------------------------------------------------------


def test_no_import_cycle_among_library_modules(graph):
    cycles = graph.cycles()
    assert not cycles, "import cycles (function-level imports count): " + "; ".join(" -> ".join(c) for c in cycles)


def test_generic_modules_never_reach_a_task(graph):
    leaks = {m: reached(graph, m, TASK_ONLY) for m in graph.files if m.startswith(GENERIC)}
    leaks = {m: found for m, found in leaks.items() if found}
    assert not leaks, f"generic modules that reach a task package or the task registry: {leaks}"


def test_params_is_a_leaf(graph):
    assert graph.edges["gdro_core.params"] == set(), graph.edges["gdro_core.params"]


def test_models_never_import_params(graph):
    found = {m: sorted(e) for m, e in graph.edges.items() if m.startswith("gdro_core.models") and "gdro_core.params" in e}
    assert not found, f"model modules that import gdro_core.params (they take plain values): {found}"


def test_the_task_protocol_imports_only_the_judge_scores(graph):
    allowed = {"gdro_core", "gdro_core.tasks", "gdro_core.tasks.base", "gdro_core.evaluation",
               "gdro_core.evaluation.judge_scores"}
    extra = sorted(graph.closure("gdro_core.tasks.base") - allowed)
    assert not extra, f"gdro_core.tasks.base reaches {extra}"


def test_the_tasks_package_and_each_task_package_import_nothing(graph):
    for package in ("gdro_core.tasks", "gdro_core.tasks.ocr", "gdro_core.tasks.geneval"):
        assert graph.edges[package] == set(), f"{package}/__init__.py imports {sorted(graph.edges[package])}"


FORBIDDEN = {
    "prompts": ("world", "reward", "judge", "task", "reader", "detectors", "rules", "shapes", "report"),
    "world": ("reward", "judge", "task", "reader", "detectors", "report"),
    "reward": ("world", "judge", "task", "report"),
    "judge": ("reward", "task", "reader", "detectors", "report"),
}
"""Per part, the modules of its own task it must not reach: prompts stand alone; the world may draw on the
prompts; the reward may use the prompts and its own helpers (reader, rules, detectors, shapes); the judge
may use the world and the prompts."""


@pytest.mark.parametrize("task", ["ocr", "geneval"])
@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_task_parts_reach_only_what_they_need(graph, task, part):
    package = f"gdro_core.tasks.{task}"
    forbidden = tuple(f"{package}.{name}" for name in FORBIDDEN[part])
    found = [m for m in reached(graph, f"{package}.{part}", forbidden) if m.rsplit(".", 1)[1] in FORBIDDEN[part]]
    assert not found, f"{package}.{part} reaches {found}"


@pytest.mark.parametrize("task, other", [("ocr", "geneval"), ("geneval", "ocr")])
def test_no_task_reaches_another(graph, task, other):
    package = f"gdro_core.tasks.{task}"
    leaks = {m: reached(graph, m, (f"gdro_core.tasks.{other}",)) for m in graph.files if m.startswith(package)}
    leaks = {m: found for m, found in leaks.items() if found}
    assert not leaks, f"{task} modules that reach the {other} task: {leaks}"


@pytest.mark.parametrize("task", ["ocr", "geneval"])
def test_task_class_module_loads_its_parts_only_inside_methods(graph, task):
    """Importing task.py loads nothing but the standard library and the protocol; each method imports its part."""
    module = f"gdro_core.tasks.{task}.task"
    heavy = [n for n in graph.top_level_imports(module)
             if n.split(".")[0] not in sys.stdlib_module_names and n != "gdro_core.tasks.base"]
    assert not heavy, f"{module} imports {heavy} at module level"


# --- the registry ------------------------------------------------------------------------------------------


def protocol_members() -> set[str]:
    """The Task protocol's attributes and methods."""
    from gdro_core.tasks.base import Task

    return {n for n in vars(Task) if not n.startswith("_")} | set(Task.__annotations__)


def test_registry_names_every_task_params_can_choose():
    from gdro_core.params import Params
    from gdro_core.tasks.registry import TASKS, task_names

    assert task_names() == list(TASKS)
    assert set(typing.get_args(Params.model_fields["task"].annotation)) == set(TASKS)


@pytest.mark.parametrize("name", ["ocr", "geneval"])
def test_registry_entries_import_and_satisfy_the_protocol(graph, name):
    from gdro_core.tasks.registry import TASKS, task_class, task_package

    module, _, cls_name = TASKS[name].partition(":")
    cls = task_class(name)
    assert cls is getattr(importlib.import_module(module), cls_name) and inspect.isclass(cls)
    assert {"name", "channels", "reward", "pixel_judge", "world_shape"} <= protocol_members()
    missing = sorted(m for m in protocol_members() if not hasattr(cls, m))
    assert not missing, f"{cls.__name__} lacks {missing} of the Task protocol"
    assert cls.name == name and cls.channels in (1, 3)
    package = task_package(name)
    assert module == f"{package}.task"
    assert all(f"{package}.{part}" in graph.files for part in PARTS), f"{package} lacks one of the parts {PARTS}"


def test_unknown_task_names_the_valid_ones():
    from gdro_core.tasks.registry import make_task, task_package

    with pytest.raises(ValueError, match="unknown task 'pose'; choose one of 'ocr', 'geneval'"):
        task_package("pose")
    with pytest.raises(ValueError, match="unknown task"):
        make_task(type("P", (), {"task": "pose"})())


def test_registry_module_imports_no_task_package(graph):
    assert not reached(graph, "gdro_core.tasks.registry", ("gdro_core.tasks.ocr", "gdro_core.tasks.geneval"))


# --- the scanner fails when it should ----------------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> Graph:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return Graph(root, "pkg")


def test_scanner_finds_a_cycle_through_a_function_level_import(tmp_path):
    g = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import f\n",
        "pkg/b.py": "def f():\n    from pkg import c\n",
        "pkg/c.py": "import pkg.a\n",
        "pkg/sub/__init__.py": "def load():\n    from pkg.sub.leaf import x\n",
        "pkg/sub/leaf.py": "from pkg.sub import other\nx = 1\n",  # parent package edges make no cycle
        "pkg/sub/other.py": "",
    })
    assert g.cycles() == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    assert g.closure("pkg.b") >= {"pkg.a", "pkg.c"}


def test_scanner_follows_type_checking_and_relative_imports_and_parent_packages(tmp_path):
    g = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/tasks/__init__.py": "",
        "pkg/tasks/x/__init__.py": "from pkg import heavy\n",
        "pkg/tasks/x/prompts.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .world import W\n",
        "pkg/tasks/x/world.py": "",
        "pkg/heavy.py": "",
    })
    assert {"pkg.tasks.x.world", "pkg.heavy"} <= g.closure("pkg.tasks.x.prompts")
    assert g.top_level_imports("pkg.tasks.x.prompts") == ["typing"]


def test_gdro_check_validates_without_loading_torch_diffusers_or_mlflow(tmp_path):
    """`gdro check` is the first DVC stage and reruns on every params change: it reads sizes, paths and code
    without the model stack (before, each check imported torch, diffusers, peft and MLflow: about 5 CPU-s)."""
    import subprocess

    import yaml
    from conftest import TINY

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    probe = ("import sys; from flows.cli import main; rc = main(['check']); "
             "print('loaded', sorted(m for m in ('torch', 'diffusers', 'peft', 'mlflow') if m in sys.modules)); "
             "sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env={**__import__("os").environ, "GDRO_ROOT": str(tmp_path), "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "params valid" in out.stdout and "loaded []" in out.stdout, out.stdout


def test_every_family_has_a_light_size_rule():
    """`gdro check` sizes images with :mod:`gdro_core.models.checkpoint_files` alone: every registered family has its
    rule there, so no family is left unchecked."""
    from gdro_core.models.checkpoint_files import SIZE_RULES
    from gdro_core.models.families import FAMILIES

    assert set(SIZE_RULES) == set(FAMILIES)


def test_the_score_stage_and_its_workers_load_no_diffusion_model_stack():
    """`score` reads images and the rollout manifest, never a diffusion model: its flow, its fan-out and its worker
    job import no diffusers or peft (about 2 CPU-s per score process and per scoring worker)."""
    import os
    import subprocess

    probe = ("import sys; import flows.score, gdro_core.data.fanout, gdro_core.tasks.jobs, gdro_core.data.rollout; "
             "print('loaded', sorted(m for m in ('diffusers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "loaded []" in out.stdout, out.stdout
