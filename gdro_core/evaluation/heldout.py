"""Held-out evaluation: sample fixed seeds, score with the task reward, summarise, draw a grid."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from PIL import Image, ImageDraw

from gdro_core.evaluation.corrected_score import corrected_score, judge_mean
from gdro_core.evaluation.judge_scores import Judge
from gdro_core.evaluation.summary import summarise  # noqa: F401 - the summary of a score table, used with assess
from gdro_core.models.base import FlowModel
from gdro_core.models.sampling import sample
from gdro_core.tasks.base import PromptRecord, Task


def eval_seeds(base_seed: int, n_prompts: int, per_prompt: int) -> list[int]:
    """The same seeds for every model, so base and trained differ only by their weights."""
    return [base_seed + i for i in range(n_prompts * per_prompt)]


def generate(
    model: FlowModel, prompts: Sequence[PromptRecord], per_prompt: int, base_seed: int, steps: int, guidance: float,
    batch_size: int,
) -> list[Image.Image]:
    """``per_prompt`` images for each prompt (prompt-major order) with deterministic seeds."""
    texts = [p.prompt for p in prompts for _ in range(per_prompt)]
    seeds = eval_seeds(base_seed, len(prompts), per_prompt)
    null = model.encode([""])
    images: list[Image.Image] = []
    for start in range(0, len(texts), batch_size):
        cond = model.encode(texts[start : start + batch_size])
        images += model.decode(sample(model, cond, null, seeds[start : start + batch_size], steps, guidance))
    return images


def assess(
    images: list[Image.Image], records: Sequence[PromptRecord], task: Task, judge: Judge, judge_task: str
) -> pd.DataFrame:
    """Task reward (and its parts), judge scores, û and the corrected score for every image."""
    scores = task.reward(images, records).reset_index(drop=True)
    judged = pd.DataFrame([j.as_dict() for j in judge.score(images, [r.prompt for r in records],
                                                             [r.target for r in records])])
    scores = pd.concat([scores, judged], axis=1)
    scores["u_hat"] = [judge_mean(row, judge_task) for row in judged.to_dict("records")]
    scores["corrected"] = [corrected_score(r, u) for r, u in zip(scores["reward"], scores["u_hat"])]
    return scores


def sample_grid(rows: dict[str, list[Image.Image]], captions: Sequence[str], scale: int = 2) -> Image.Image:
    """One row per model (label on the left), one column per prompt (target on top)."""
    first = next(iter(rows.values()))[0]
    w, h = first.width * scale, first.height * scale
    label_w, cap_h, n = 64, 14, len(captions)
    grid = Image.new("RGB", (label_w + n * w, cap_h + len(rows) * h), "white")
    draw = ImageDraw.Draw(grid)
    for j, c in enumerate(captions):
        draw.text((label_w + j * w + 2, 1), c[: w // 6], fill="black")
    for i, (label, images) in enumerate(rows.items()):
        draw.text((2, cap_h + i * h + h // 2 - 6), label, fill="black")
        for j, im in enumerate(images[:n]):
            grid.paste(im.convert("RGB").resize((w, h), Image.Resampling.NEAREST), (label_w + j * w, cap_h + i * h))
    return grid
