"""The reward table: every rollout image scored once by the task reward."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
from PIL import Image

from gdro_core.tasks.ocr import Reader, ocr_reward
from gdro_core.data.store import atomic_write

Progress = Callable[[int, int], None]


def score_images(
    images: list[Image.Image], targets: list[str], reader: Reader, substring_full_credit: bool, batch_size: int,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Columns read, reward, exact, similarity for each (image, target)."""
    records = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        for read, target in zip(reader.read(chunk), targets[start : start + batch_size]):
            s = ocr_reward(read, target, substring_full_credit)
            records.append({"read": s.read, "reward": s.reward, "exact": s.exact, "similarity": s.similarity})
        if progress:
            progress(min(start + batch_size, len(images)), len(images))
    return pd.DataFrame.from_records(records, columns=["read", "reward", "exact", "similarity"])


def score_rollouts(rows: list[dict], rollout_dir: Path, reader: Reader, substring_full_credit: bool, batch_size: int,
                   progress: Progress | None = None) -> pd.DataFrame:
    """One row per rollout image: its manifest row plus its scores."""
    images = [Image.open(Path(rollout_dir) / r["image"]) for r in rows]
    scores = score_images(images, [r["target"] for r in rows], reader, substring_full_credit, batch_size, progress)
    return pd.concat([pd.DataFrame.from_records(rows), scores], axis=1)


def score_task_rollouts(rows: list[dict], rollout_dir: Path, task, progress: Progress | None = None) -> pd.DataFrame:
    """One row per rollout image: its manifest row plus the task reward and its parts."""
    images = [Image.open(Path(rollout_dir) / r["image"]) for r in rows]
    scores = task.reward(images, [task.record(r["prompt"], r["target"]) for r in rows], progress)
    return pd.concat([pd.DataFrame.from_records(rows), scores.reset_index(drop=True)], axis=1)


def write_table(table: pd.DataFrame, path: Path) -> Path:
    return atomic_write(Path(path), lambda p: table.to_parquet(p, index=False))


def reward_matrix(table: pd.DataFrame, n_prompts: int, per_prompt: int):
    """Rewards as a (P, N) tensor aligned with the rollout latents; rejects missing or NaN entries."""
    import torch

    if len(table) != n_prompts * per_prompt:
        raise ValueError(
            f"reward table has {len(table)} rows but rollouts hold {n_prompts}x{per_prompt}: rerun `gdro score`"
        )
    t = table.sort_values(["prompt_index", "member"])
    r = torch.tensor(t["reward"].to_numpy(dtype="float32")).view(n_prompts, per_prompt)
    if torch.isnan(r).any():
        raise ValueError("reward table contains NaN rewards: rerun `gdro score`")
    return r
