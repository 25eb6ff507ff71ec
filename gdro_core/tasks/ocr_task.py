"""The OCR task behind the task seam: quoted-text prompts, the OCR reward, the text-rendering world."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from gdro_core.data import prompts as ocr_prompts
from gdro_core.tasks.base import Progress, words_of
from gdro_core.tasks.ocr import Reader, reader_from_params


class OcrTask:
    """Prompts ask for a quoted string; the reward is Flow-GRPO's OCR edit similarity."""

    name = "ocr"
    channels = 1

    def __init__(self, params, reader: Reader | None = None):
        self.params = params
        self._reader = reader

    @property
    def reader(self) -> Reader:
        """Built on first use: the reader's weights load only when something is scored."""
        if self._reader is None:
            self._reader = reader_from_params(self.params)
        return self._reader

    def make_prompt_sets(self, root: Path = Path(".")) -> dict[str, list[ocr_prompts.OcrPrompt]]:
        """Generated over the world's alphabet, or read from ``prompts.source``; validated either way."""
        w, p = self.params.world, self.params.prompts
        if p.source:
            sets = ocr_prompts.load_prompt_source(Path(root) / p.source, p.n_val)
        else:
            sets = ocr_prompts.make_prompt_sets(
                w.alphabet, w.min_len, w.max_len, p.templates, p.n_train, p.n_test, p.seed, p.n_val
            )
        ocr_prompts.validate_prompt_sets(sets, self.params, p.source or "generated prompt sets")
        return sets

    def write_prompts(self, path: Path, records: Sequence[ocr_prompts.OcrPrompt]) -> None:
        ocr_prompts.write_prompts(path, list(records))

    def read_prompts(self, path: Path) -> list[ocr_prompts.OcrPrompt]:
        return ocr_prompts.read_prompts(path)

    def record(self, prompt: str, target: str) -> ocr_prompts.OcrPrompt:
        return ocr_prompts.OcrPrompt(prompt, target)

    def reward(self, images: list[Image.Image], records: Sequence, progress: Progress | None = None) -> pd.DataFrame:
        from gdro_core.data.scoring import score_images

        r = self.params.reward
        return score_images(images, [q.target for q in records], self.reader, r.substring_full_credit, r.batch_size,
                            progress)

    def summarise(self, scores: pd.DataFrame) -> dict[str, float]:
        from gdro_core.evaluation.heldout import summarise

        return summarise(scores)

    def ceiling(self, records: Sequence) -> dict[str, float]:
        from gdro_core.evaluation.heldout import reader_ceiling

        w, r = self.params.world, self.params.reward
        return reader_ceiling([q.target for q in records], self.reader, w.height, w.width, w.font_size,
                              r.substring_full_credit, r.batch_size)

    @property
    def world_shape(self) -> tuple[int, int]:
        return self.params.world.height, self.params.world.width

    def pretrain_batch(self, n: int, cfg, rng: random.Random) -> tuple[np.ndarray, list[str]]:
        from gdro_core.training.pretrain import text_batch

        return text_batch(self.params.world, self.params.prompts.templates)(n, cfg, rng)

    def caption_words(self) -> list[str]:
        return words_of([t.format(text="") for t in self.params.prompts.templates])

    def pixel_judge(self, judge_params):
        from gdro_core.evaluation.judge import PixelJudge, pixel_judge_config

        return PixelJudge(pixel_judge_config(self.params.world, judge_params))
