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


def builtin_tokenizer(params: Params):
    """The tokenizer the built-in model is built with: character-level, or the task's caption words whole."""
    from gdro_core.models.builtin import build_tokenizer

    return build_tokenizer(caption_words(params))


def caption_words(params: Params) -> list[str]:
    """The words the built-in tokenizer reads whole: none (``model.builtin.tokenizer: char``) or the task's."""
    return make_task(params).caption_words() if params.model.builtin.tokenizer == "word" else []


def world_of(params: Params):
    """The params section sizing the built-in model's images: ``world`` for OCR, ``geneval.world`` for GenEval."""
    return params.geneval.world if params.task == "geneval" else params.world


def channels_of(params: Params) -> int:
    """Image channels of the task's world: OCR renders grayscale, GenEval colour."""
    return 3 if params.task == "geneval" else 1
