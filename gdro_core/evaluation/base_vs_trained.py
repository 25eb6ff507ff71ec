"""The evaluate stage's measurement: base and trained model on the same held-out prompts and seeds.

Both models draw the same noise, so they differ only by the adapter; the trained-prompt rows (optional) draw
noise no rollout drew. The world's ceiling (its own clean images scored by the reward) exists only for the
built-in model, whose world draws them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from gdro_core.evaluation.intervals import prompt_bootstrap
from gdro_core.evaluation.heldout import assess, generate, sample_grid
from gdro_core.evaluation.judge_scores import Judge
from gdro_core.models.base import FlowModel
from gdro_core.tasks.base import PromptRecord, Task

DELTAS = ("reward", "corrected", "geneval", "second_reward")
TRAIN_DELTAS = ("reward", "geneval")


def evaluate_models(
    model: FlowModel, adapter_dir: Path, task: Task, judge: Judge, judge_task: str, prompts: Sequence[PromptRecord],
    train_prompts: Sequence[PromptRecord], per_prompt: int, seed: int, train_seed: int, steps: int, guidance: float,
    batch_size: int, grid_prompts: int, with_ceiling: bool, log: Callable[[str], None] = lambda line: None,
    bootstrap_samples: int = 0, ci_level: float = 0.95,
) -> dict:
    """``metrics`` (base, trained, delta; ``*_train`` on training prompts; ``ceiling`` where there is a world;
    ``ci``: their intervals from ``bootstrap_samples`` resamples of the held-out prompts, none for 0), the sample
    ``grid``, every image's ``scores`` and the held-out ``images`` of each model (prompt order, seed order)."""
    records = [q for q in prompts for _ in range(per_prompt)]

    def sample_on(chosen: Sequence[PromptRecord], first_seed: int) -> list[Image.Image]:
        return generate(model, chosen, per_prompt, first_seed, steps, guidance, batch_size)

    images, metrics, tables = {}, {}, []
    for name in ("base", "trained"):
        if name == "trained":
            model.load_adapter(adapter_dir)
        images[name] = sample_on(prompts, seed)
        scores = assess(images[name], records, task, judge, judge_task)
        metrics[name] = task.summarise(scores) | task.second_opinion(images[name], records)
        tables.append(scores.assign(model=name, target=[q.target for q in records]))
        log(f"{name}: {metrics[name]}")
        if train_prompts:
            seen = task.reward(sample_on(train_prompts, train_seed), [q for q in train_prompts for _ in range(per_prompt)])
            metrics[f"{name}_train"] = task.summarise(seen)
            log(f"{name} on training prompts: {metrics[f'{name}_train']}")
    if bootstrap_samples:
        prompt_ids = np.repeat(np.arange(len(prompts)), per_prompt)
        metrics["ci"] = prompt_bootstrap(tables[0], tables[1], prompt_ids, task.summarise, bootstrap_samples,
                                         ci_level, seed)
    if with_ceiling:
        metrics["ceiling"] = task.ceiling(prompts)
    metrics["delta"] = {k: metrics["trained"][k] - metrics["base"][k] for k in DELTAS if k in metrics["base"]}
    if train_prompts:
        metrics["delta_train"] = {k: metrics["trained_train"][k] - metrics["base_train"][k]
                                  for k in TRAIN_DELTAS if k in metrics["base_train"]}
    n = min(grid_prompts, len(prompts))
    grid = sample_grid({k: v[::per_prompt][:n] for k, v in images.items()},
                       [getattr(q, "caption", q.target) for q in prompts[:n]])
    return {"metrics": metrics, "grid": grid, "scores": pd.concat(tables, ignore_index=True), "images": images}


def flat_metrics(metrics: dict) -> dict[str, float]:
    """``{"trained.reward": ...}``: the numbers of a metrics.json (its ``judge`` section, text, is left out)."""
    return {f"{k}.{m}": float(v) for k, d in metrics.items() if isinstance(d, dict)
            for m, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
