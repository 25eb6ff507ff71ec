"""The OCR task behind the task seam: quoted-text prompts, the OCR reward, the text-rendering world.

Each method imports the part it needs (:mod:`.prompts`, :mod:`.world`, :mod:`.reader` and :mod:`.reward`,
:mod:`.judge`) when it runs, so a stage that only reads prompts never loads the reader or the judge.
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
    from gdro_core.tasks.ocr.prompts import OcrPrompt
    from gdro_core.tasks.ocr.reader import Reader


class OcrTask:
    """Prompts ask for a quoted string; the reward is Flow-GRPO's OCR edit similarity."""

    name = "ocr"
    channels = 1

    def __init__(self, params, reader: Reader | None = None):
        self.params = params
        self._reader = reader
        self._scorer: Reward | None = None

    @property
    def reader(self) -> Reader:
        """Built on first use: the reader's weights load only when something is scored."""
        if self._reader is None:
            from gdro_core.tasks.ocr.reader import reader_from_params

            self._reader = reader_from_params(self.params)
        return self._reader

    # prompt records
    def make_prompt_sets(self, root: Path = Path(".")) -> dict[str, list[OcrPrompt]]:
        """Generated over the world's alphabet, or read from ``prompts.source``; validated either way."""
        from gdro_core.tasks.ocr import prompts

        w, p = self.params.world, self.params.prompts
        if p.source:
            sets = prompts.load_prompt_source(Path(root) / p.source, p.n_val)
        else:
            sets = prompts.make_prompt_sets(
                w.alphabet, w.min_len, w.max_len, p.templates, p.n_train, p.n_test, p.seed, p.n_val
            )
        prompts.validate_prompt_sets(sets, self.params, p.source or "generated prompt sets")
        return sets

    def write_prompts(self, path: Path, records: Sequence[OcrPrompt]) -> None:
        from gdro_core.tasks.ocr.prompts import write_prompts

        write_prompts(path, list(records))

    def read_prompts(self, path: Path) -> list[OcrPrompt]:
        from gdro_core.tasks.ocr.prompts import read_prompts

        return read_prompts(path)

    def record(self, prompt: str, target: str) -> OcrPrompt:
        from gdro_core.tasks.ocr.prompts import OcrPrompt

        return OcrPrompt(prompt, target)

    def caption_words(self) -> list[str]:
        from gdro_core.tasks.ocr.prompts import caption_words

        return caption_words(self.params)

    # reward
    @property
    def scorer(self) -> Reward:
        """The OCR reward, or the weighted sum ``rewards.weights`` names (built on first use)."""
        if self._scorer is None:
            from gdro_core.rewards.registry import task_reward
            from gdro_core.tasks.ocr.reward import OcrReward

            self._scorer = task_reward(self.params, lambda: OcrReward(self.params, self.reader))
        return self._scorer

    def reward(self, images: list[Image.Image], records: Sequence, progress: Progress | None = None) -> pd.DataFrame:
        return self.scorer.score(images, records, progress)

    def summarise(self, scores: pd.DataFrame) -> dict[str, float]:
        from gdro_core.rewards.weighted import part_means
        from gdro_core.tasks.ocr.reward import summarise

        return summarise(scores) | part_means(scores, list(self.params.rewards.weights))

    def second_reader(self) -> str:
        """The reader ``evaluate.second_reader`` names ('' for none); ``auto``: the other backend, when installed."""
        choice, training = self.params.evaluate.second_reader, self.params.reward.backend
        if choice != "auto":
            return "" if choice in ("none", training) else choice
        other = "rapidocr" if training == "easyocr" else "easyocr"
        import importlib.util

        package = "rapidocr_onnxruntime" if other == "rapidocr" else "easyocr"
        return other if importlib.util.find_spec(package) is not None else ""

    def second_opinion(self, images: list[Image.Image], records: Sequence) -> dict[str, float]:
        """The OCR reward read by the other reader (same upscale, pad and alphabet), and which reader that was."""
        backend = self.second_reader()
        if not backend:
            return {}
        from gdro_core.tasks.ocr.reader import make_reader
        from gdro_core.tasks.ocr.reward import score_images

        r = self.params.reward
        allow = self.params.world.alphabet if r.restrict_to_alphabet else None
        reader = make_reader(backend, r.upscale, r.pad, allow, r.reader_mode)
        table = score_images(list(images), [q.target for q in records], reader, r.substring_full_credit, r.batch_size)
        return {"second_reward": float(table["reward"].mean()), "second_exact": float(table["exact"].mean())}

    def ceiling(self, records: Sequence) -> dict[str, float]:
        """The reward of the world's own clean renders: the best any model can score with this reader."""
        from gdro_core.tasks.ocr.reward import reader_ceiling
        from gdro_core.tasks.ocr.world import clean_images

        targets = [q.target for q in records]
        r = self.params.reward
        return reader_ceiling(clean_images(targets, self.params.world), targets, self.reader,
                              r.substring_full_credit, r.batch_size)

    # the built-in world
    @property
    def world_shape(self) -> tuple[int, int]:
        return self.params.world.height, self.params.world.width

    def pretrain_batch(self, n: int, cfg, rng: random.Random) -> tuple[np.ndarray, list[str]]:
        from gdro_core.tasks.ocr.world import text_batch

        return text_batch(self.params.world, self.params.prompts.templates)(n, cfg, rng)

    def pixel_judge(self, judge_params):
        from gdro_core.tasks.ocr.judge import PixelJudge, pixel_judge_config

        return PixelJudge(pixel_judge_config(self.params.world, judge_params))
