"""The task registry: each task's class by name, imported only when that task is made.

``TASKS`` maps a task name (``params.task``) to ``"module:Class"``. The class is imported with
:mod:`importlib` from that string, so code that makes a task by name does not import every task's
package, and a static import scan sees no task package from here. A new task is one new package
under :mod:`gdro_core.tasks` (parts ``task``, ``prompts``, ``world``, ``reward``, ``judge``) plus one
line here (and its name in ``Params.task``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gdro_core.params import Params
    from gdro_core.tasks.base import Task

TASKS: dict[str, str] = {
    "ocr": "gdro_core.tasks.ocr.task:OcrTask",
    "geneval": "gdro_core.tasks.geneval.task:GenEvalTask",
    "general": "gdro_core.tasks.general.task:GeneralTask",
}


def task_names() -> list[str]:
    """The tasks ``params.task`` can name."""
    return list(TASKS)


def _entry(name: str) -> str:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(repr(n) for n in TASKS)}")
    return TASKS[name]


def task_package(name: str) -> str:
    """The package holding task ``name``'s parts, e.g. ``gdro_core.tasks.ocr``."""
    return _entry(name).partition(":")[0].rpartition(".")[0]


def task_class(name: str) -> type:
    """Task ``name``'s class, imported from its ``TASKS`` entry."""
    module, _, cls = _entry(name).partition(":")
    return getattr(importlib.import_module(module), cls)


def make_task(params: Params, **kwargs) -> Task:
    """The task ``params.task`` names, configured from its params section."""
    return task_class(params.task)(params, **kwargs)


def caption_words(params: Params) -> list[str]:
    """The words the built-in tokenizer reads whole: none (``model.builtin.tokenizer: char``) or the task's."""
    return make_task(params).caption_words() if params.model.builtin.tokenizer == "word" else []
