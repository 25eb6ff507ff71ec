"""The general task behind the task seam: plain prompts, the rewards ``rewards.weights`` names, no world.

Without a built-in world there is nothing to pretrain and no pixel judge: the params require a checkpoint
(``model.source``) and the VLM judge, and the methods that need a world say so.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gdro_core.tasks.base import Progress

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from PIL import Image

    from gdro_core.rewards.base import Reward
    from gdro_core.tasks.general.prompts import GeneralPrompt

NO_WORLD = ("task 'general' has no built-in world: set model.source to your checkpoint and judge.kind to "
            "unified_reward, or use task ocr or geneval")


class GeneralTask:
    name = "general"
    channels = 3

    def __init__(self, params):
        self.params = params
        self._scorer: Reward | None = None

    # prompt records
    def make_prompt_sets(self, root: Path = Path(".")) -> dict[str, list[GeneralPrompt]]:
        from gdro_core.tasks.general.prompts import load_prompt_source, validate_prompt_sets

        p = self.params.prompts
        sets = load_prompt_source(Path(root) / p.source, p.n_val)
        validate_prompt_sets(sets, p.source)
        return sets

    def write_prompts(self, path: Path, records: Sequence[GeneralPrompt]) -> None:
        from gdro_core.tasks.general.prompts import write_prompts

        write_prompts(path, list(records))

    def read_prompts(self, path: Path) -> list[GeneralPrompt]:
        from gdro_core.tasks.general.prompts import read_prompts

        return read_prompts(path)

    def record(self, prompt: str, target: str) -> GeneralPrompt:
        from gdro_core.tasks.general.prompts import GeneralPrompt

        return GeneralPrompt(prompt, target)

    def caption_words(self) -> list[str]:
        return []

    # reward
    @property
    def scorer(self) -> Reward:
        """The weighted sum of the rewards ``rewards.weights`` names (built on first use)."""
        if self._scorer is None:
            from gdro_core.rewards.registry import task_reward

            def own() -> Reward:
                raise ValueError("task 'general' has no reward of its own: name rewards in rewards.weights")

            self._scorer = task_reward(self.params, own)
        return self._scorer

    def reward(self, images: list[Image.Image], records: Sequence, progress: Progress | None = None) -> pd.DataFrame:
        return self.scorer.score(images, records, progress)

    def summarise(self, scores: pd.DataFrame) -> dict[str, float]:
        from gdro_core.evaluation.summary import summarise
        from gdro_core.rewards.weighted import part_means

        return summarise(scores, ("reward",)) | part_means(scores, list(self.params.rewards.weights))

    def second_opinion(self, images: list[Image.Image], records: Sequence) -> dict[str, float]:
        return {}  # no second scorer configured for this task

    def ceiling(self, records: Sequence) -> dict[str, float]:
        raise ValueError(NO_WORLD)

    # no built-in world
    @property
    def world_shape(self) -> tuple[int, int]:
        return self.params.world.height, self.params.world.width

    def pretrain_batch(self, n: int, cfg, rng: random.Random) -> tuple[np.ndarray, list[str]]:
        raise ValueError(NO_WORLD)

    def pixel_judge(self, judge_params):
        raise ValueError(NO_WORLD)
