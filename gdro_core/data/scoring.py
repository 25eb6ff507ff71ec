"""The reward table: every rollout image scored once by the task reward.

Scoring is split by rollout shard so that shards can be scored on separate workers; the table
is put back in (prompt_index, member) order, so it is the same bytes whoever scored which shard.
A task whose reward can fail on single images (the OCR reader) scores them 0 and keeps the error
in an ``error`` column instead of ending the run; :func:`check_errors` fails the stage once the
share of such images passes a threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
from PIL import Image

from gdro_core.data.store import atomic_write
from gdro_core.tasks.base import Task

Progress = Callable[[int, int], None]
ORDER = ["prompt_index", "member"]


class ScoringError(RuntimeError):
    """Too many images could not be scored."""


def score_task_rollouts(
    rows: list[dict], rollout_dir: Path, task: Task, progress: Progress | None = None
) -> pd.DataFrame:
    """One row per rollout image: its manifest row plus the task reward and its parts."""
    images = [open_rollout_image(Path(rollout_dir), r["image"]) for r in rows]
    scores = task.reward(images, [task.record(r["prompt"], r["target"]) for r in rows], progress)
    return pd.concat([pd.DataFrame.from_records(rows), scores.reset_index(drop=True)], axis=1)


def open_rollout_image(rollout_dir: Path, name: str) -> Image.Image:
    """A rollout image, read now; a missing or unreadable file names itself and how to remake it."""
    path = rollout_dir / name
    try:
        im = Image.open(path)
        im.load()  # decodes now (and closes the file), so a bad file fails here, not inside the reward
        return im
    except FileNotFoundError:
        problem = "is missing"
    except (OSError, SyntaxError, ValueError) as err:  # PIL: UnidentifiedImageError, truncated or corrupt data
        problem = f"is not a readable image ({type(err).__name__})"
    raise RolloutImageError(
        f"rollout image {path} {problem}: run `gdro rollout` (or `dvc repro rollout`), which rebuilds missing and "
        "corrupt images from the stored latents, then `gdro score`"
    )


class RolloutImageError(ValueError):
    """A rollout image that cannot be read; the message says how to remake it."""


def split_rows(manifest: dict) -> list[list[dict]]:
    """The manifest's rows in chunks of one rollout shard's size (the unit of scoring work)."""
    rows = manifest["rows"]
    size = -(-len(rows) // max(1, len(manifest["shards"])))
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def merge_tables(parts: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """One table in (prompt_index, member) order, whatever order the parts were scored in."""
    table = pd.concat(list(parts), ignore_index=True)
    return table.sort_values(ORDER, kind="stable").reset_index(drop=True)


def check_errors(table: pd.DataFrame, max_share: float) -> int:
    """The number of images the reward failed on (its reader, or a user's reward); raise once their share exceeds
    ``max_share``."""
    if "error" not in table:  # a task whose reward records no per-image errors
        return 0
    failed = table["error"].astype(bool)
    n = int(failed.sum())
    if n and n / len(table) > max_share:
        first = table.loc[failed, "error"].iloc[0]
        raise ScoringError(
            f"the reward failed on {n} of {len(table)} images ({n / len(table):.1%} > reward.max_error_share "
            f"{max_share:.1%}); first error: {first}. Fix the reward (or its reader), or raise reward.max_error_share"
        )
    return n


ROLLOUT_KEY = b"gdro.rollout_fingerprint"


class RewardTableError(ValueError):
    """A reward table that does not belong to the rollouts beside it."""


def write_table(table: pd.DataFrame, path: Path, rollout_fingerprint: str = "") -> Path:
    """The reward table as parquet, stamped with the fingerprint of the rollouts it scored."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), ROLLOUT_KEY: rollout_fingerprint.encode()})
    return atomic_write(Path(path), lambda p: pq.write_table(arrow, p))


def read_table(path: Path, rollout_fingerprint: str) -> pd.DataFrame:
    """The reward table, refused unless it scored exactly the rollouts with ``rollout_fingerprint``."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise RewardTableError(f"no reward table at {path}: run `gdro score` first")
    arrow = pq.read_table(path)
    scored = (arrow.schema.metadata or {}).get(ROLLOUT_KEY, b"").decode()
    if not scored:
        raise RewardTableError(
            f"{path} does not say which rollouts it scored (written by hand, e.g. pandas' to_parquet, which drops the "
            "stamp `gdro score` writes): run `gdro score` (or `dvc repro score`) to score them, or bring your own "
            "rewards with `gdro import` (README \"Your own images\")")
    if scored != rollout_fingerprint:
        raise RewardTableError(
            f"{path} scored other rollouts ({scored[:12]}) than the ones now in the rollout directory "
            f"({rollout_fingerprint[:12]}): run `gdro score` (or `dvc repro score`) to score them"
        )
    return arrow.to_pandas()


def reward_matrix(table: pd.DataFrame, n_prompts: int, per_prompt: int):
    """Rewards as a (P, N) tensor aligned with the rollout latents; rejects missing or NaN entries."""
    import torch

    if len(table) != n_prompts * per_prompt:
        raise ValueError(
            f"reward table has {len(table)} rows but rollouts hold {n_prompts}x{per_prompt}: rerun `gdro score`"
        )
    keys = table[ORDER].astype("int64")
    dup = keys.duplicated(keep=False)
    if dup.any():
        first = keys[dup].iloc[0]
        raise RewardTableError(
            f"reward table has {int(dup.sum())} rows for repeated images (e.g. prompt_index {first.prompt_index}, "
            f"member {first.member}); each rollout image must occur exactly once: rerun `gdro score`"
        )
    inside = keys["prompt_index"].between(0, n_prompts - 1) & keys["member"].between(0, per_prompt - 1)
    if not inside.all():
        bad = keys[~inside].iloc[0]
        raise RewardTableError(f"reward table row prompt_index {bad.prompt_index}, member {bad.member} is no rollout "
                               f"image (the rollouts hold {n_prompts}x{per_prompt}): rerun `gdro score`")
    t = table.sort_values(ORDER)
    r = torch.tensor(t["reward"].to_numpy(dtype="float32")).view(n_prompts, per_prompt)
    if torch.isnan(r).any():
        raise ValueError("reward table contains NaN rewards: rerun `gdro score`")
    return r
