"""The task seam: what images are asked for and how they are rewarded, with the world the built-in model learns.

Every stage works through a :class:`Task`: the prompts stage writes its prompt sets, the base stage
pretrains on its world, the score stage, the checkpoint monitor, the online baseline and the evaluate
stage reward images with it, and the pixel judge takes its references from its world. The flows build
the task named in params with :func:`gdro_core.tasks.registry.make_task`; library code receives it as an
argument and imports nothing but this module's types.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from gdro_core.evaluation.judge_scores import Judge

if TYPE_CHECKING:
    import random

    import numpy as np
    import pandas as pd
    from PIL import Image

Progress = Callable[[int, int], None]


def words_of(texts: Sequence[str]) -> list[str]:
    """The distinct lower-case words (runs of letters) in ``texts``, sorted."""
    return sorted({w for t in texts for w in re.findall(r"[a-z]+", t.lower())})


class PromptRecord(Protocol):
    """A prompt plus its metadata. ``target`` is the metadata as one string, so rollout rows can carry it."""

    @property
    def prompt(self) -> str: ...

    @property
    def target(self) -> str: ...


class Task(Protocol):
    name: str
    channels: int  # image channels of the task's world (1: grayscale, 3: RGB)

    def make_prompt_sets(self, root: Path = Path(".")) -> dict[str, list[PromptRecord]]:
        """Train, test and validation prompt sets (disjoint, validated); files named in params are under ``root``."""
        ...

    def write_prompts(self, path: Path, records: Sequence[PromptRecord]) -> None: ...

    def read_prompts(self, path: Path) -> list[PromptRecord]: ...

    def record(self, prompt: str, target: str) -> PromptRecord:
        """The record a (prompt, target) pair from a rollout row stands for."""
        ...

    def reward(self, images: list[Image.Image], records: Sequence[PromptRecord],
               progress: Progress | None = None) -> pd.DataFrame:
        """One row per image: ``reward`` and its parts."""
        ...

    def summarise(self, scores: pd.DataFrame) -> dict[str, float]:
        """Means of the reward, its parts and the judge columns (per-tag means where the task has tags)."""
        ...

    def second_opinion(self, images: list[Image.Image], records: Sequence[PromptRecord]) -> dict[str, float]:
        """The held-out images' reward under a scorer training never saw (``second_*`` keys; empty when the task
        has none): a gain that fits the training scorer's quirks shows as a smaller gain here."""
        ...

    def ceiling(self, records: Sequence[PromptRecord]) -> dict[str, float]:
        """The summary of the world's own clean images for ``records``: the best a model can score."""
        ...

    @property
    def world_shape(self) -> tuple[int, int]:
        """(height, width) of the images."""
        ...

    def pretrain_batch(self, n: int, cfg, rng: random.Random) -> tuple[np.ndarray, list[str]]:
        """n world images as float32 (n, C, H, W) in [-1, 1] and their captions ('' for dropped ones)."""
        ...

    def caption_words(self) -> list[str]:
        """The words of the built-in world's captions (what ``model.builtin.tokenizer: word`` reads whole)."""
        ...

    def pixel_judge(self, judge_params) -> Judge:
        """The built-in world's pixel judge, with references from the world's clean images."""
        ...
