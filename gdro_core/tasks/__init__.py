"""Tasks: what is asked of an image and how it is rewarded (OCR, GenEval), with the built-in world that renders it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gdro_core.params import Params
    from gdro_core.tasks.base import Task


def make_task(params: Params, **kwargs) -> Task:
    """The task ``params.task`` names, configured from its params section."""
    if params.task == "ocr":
        from gdro_core.tasks.ocr_task import OcrTask

        return OcrTask(params, **kwargs)
    if params.task == "geneval":
        from gdro_core.tasks.geneval import GenEvalTask

        return GenEvalTask(params, **kwargs)
    raise ValueError(f"unknown task {params.task!r}; choose 'ocr' or 'geneval'")


def world_of(params: Params):
    """The params section sizing the built-in model's images: ``world`` for OCR, ``geneval.world`` for GenEval."""
    return params.geneval.world if params.task == "geneval" else params.world


def channels_of(params: Params) -> int:
    """Image channels of the task's world: OCR renders grayscale, GenEval colour."""
    return 3 if params.task == "geneval" else 1
