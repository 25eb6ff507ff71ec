"""The VLM judge as a reward: a UnifiedReward-style vision-language model scores each image against its prompt
on alignment, coherence and style (1-5 each, the judge's prompt and answer parser of
:mod:`gdro_core.evaluation.vlm_judge`), and the reward is the mean of the chosen dimensions:

    reward = mean_{d ∈ dimensions} s_d,   s_d ∈ [1, 5]

An image whose answer lacks a chosen dimension's score (or whose generation fails) is not fatal: its row's
``error`` says why and its reward is 0, so the score stage's ``reward.max_error_share`` decides whether too many
went missing. The three scores are kept as parts (NaN where the answer lacks them).

Needs on disk (``model_path``): a transformers image-text-to-text checkpoint with its processor and chat
template, e.g. UnifiedReward-qwen-7b (Qwen2.5-VL). This reward is a separate model from ``judge.model_path``
(the judge of the corrected score); training against the judge that later scores the checkpoints would leave no
independent check of reward hacking.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gdro_core.preflight import PROCESSOR_FILES, TOKENIZER_FILES, WEIGHT_FILES, pretrained_dir
from gdro_core.rewards.base import Progress, RewardError, RewardRecord

DIMENSIONS = ("alignment", "coherence", "style")


class VlmReward:
    name = "vlm"
    needs_world = False

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")

        model_path: str = Field(description="Local directory of the UnifiedReward-style VLM (config.json, weights, "
                                            "processor with chat template).")
        dimensions: list[Literal["alignment", "coherence", "style"]] = Field(
            list(DIMENSIONS), description="Judge dimensions whose mean is the reward.")
        max_new_tokens: int = Field(256, ge=8, description="Generation length of each answer.")
        device: str = Field("auto", description="'auto': this process's accelerator, else the CPU.")

        @field_validator("dimensions")
        @classmethod
        def _some(cls, dims: list[str]) -> list[str]:
            if not dims:
                raise ValueError(f"name at least one of {', '.join(DIMENSIONS)}")
            return list(dict.fromkeys(dims))

    def __init__(self, model_path: str, dimensions: Sequence[str] = DIMENSIONS, max_new_tokens: int = 256,
                 device: str = "auto", judge=None):
        """``judge``: an already built :class:`~gdro_core.evaluation.vlm_judge.UnifiedRewardJudge` (else loaded
        from ``model_path``)."""
        self.dimensions = list(dimensions)
        if judge is None:
            problems = self.check(model_path, Path("."))
            if problems:
                raise RewardError("reward 'vlm': " + "; ".join(f"rewards.options.vlm.{p}" for p in problems))
            from gdro_core.evaluation.vlm_judge import UnifiedRewardJudge

            try:
                judge = UnifiedRewardJudge.from_pretrained(model_path, max_new_tokens, device)
            except Exception as err:  # noqa: BLE001 - any load failure is the reward's, in one line
                raise RewardError(f"reward 'vlm': cannot load the VLM in {model_path} ({type(err).__name__}: "
                                  f"{(str(err).strip().splitlines() or [''])[0]})") from None
        self.judge = judge

    @staticmethod
    def check(model_path: str, root: Path) -> list[str]:
        return pretrained_dir("model_path", model_path, Path(root), "the UnifiedReward-style VLM",
                              (("config.json",), WEIGHT_FILES, PROCESSOR_FILES + TOKENIZER_FILES))

    @classmethod
    def preflight(cls, options: dict, root: Path) -> list[str]:
        return cls.check(options["model_path"], root)

    def _one(self, image: Image.Image, prompt: str) -> dict:
        from gdro_core.evaluation.judge_scores import SCORE_MAX, SCORE_MIN
        from gdro_core.evaluation.vlm_judge import _SCORE

        try:
            text = self.judge.answer(image, prompt)
        except Exception as err:  # noqa: BLE001 - one image's failure is its row's error, counted by check_errors
            return {"reward": 0.0, **{d: np.nan for d in DIMENSIONS},
                    "error": f"judge failed: {type(err).__name__}: {err}".splitlines()[0]}
        found = {name.lower(): min(max(float(value), SCORE_MIN), SCORE_MAX) for name, value in _SCORE.findall(text)}
        parts = {d: found.get(d, np.nan) for d in DIMENSIONS}
        missing = [d for d in self.dimensions if d not in found]
        if missing:
            return {"reward": 0.0, **parts,
                    "error": f"judge answer lacks {missing} scores: {' '.join(text.split())[:120]!r}"}
        return {"reward": float(np.mean([found[d] for d in self.dimensions])), **parts, "error": ""}

    def score(self, images: list[Image.Image], records: Sequence[RewardRecord],
              progress: Progress | None = None) -> pd.DataFrame:
        """One row per image: ``reward`` (mean of the chosen dimensions), ``alignment``, ``coherence``, ``style``
        and ``error`` (a missing answer: reward 0, the error says which scores it lacks)."""
        rows = []
        for i, (im, r) in enumerate(zip(images, records)):
            rows.append(self._one(im, r.prompt))
            if progress:
                progress(i + 1, len(images))
        return pd.DataFrame.from_records(rows, columns=["reward", *DIMENSIONS, "error"])
