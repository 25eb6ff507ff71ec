"""A weighted sum of rewards as one reward: ``reward = Σ wᵢ rᵢ``, with every part kept as a column.

Each reward's total is the column named after it, its own parts ``<name>.<part>``. The task's own reward
(``primary``) keeps its parts under their own names (``exact``, ``strict``, ...), so everything that reads
the task's columns (the score summary, GenEval's per-tag report) reads them unchanged. An image one reward
fails on keeps that reward's error (named) in its ``error`` column and scores 0 for that part.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from gdro_core.rewards.base import Progress, Reward, RewardError, RewardRecord, call_score, where_it_failed


class WeightedReward:
    name = "weighted"

    def __init__(self, parts: Sequence[tuple[str, float, Reward]], primary: str = ""):
        if not parts:
            raise RewardError("a weighted reward needs at least one reward")
        self.parts, self.primary = list(parts), primary
        self.needs_world = any(getattr(r, "needs_world", False) for _, _, r in self.parts)

    def score(self, images: list[Image.Image], records: Sequence[RewardRecord],
              progress: Progress | None = None) -> pd.DataFrame:
        total = np.zeros(len(images))
        columns: dict[str, pd.Series] = {}
        errors = [[] for _ in images]
        for i, (name, weight, reward) in enumerate(self.parts):
            step = (lambda done, n, i=i: progress(i * n + done, len(self.parts) * n)) if progress else None
            try:
                table = as_table(call_score(reward.score, images, records, step), name)
            except RewardError:
                raise
            except Exception as err:
                raise RewardError(f"reward {name!r} failed on a batch of {len(images)} images ({type(err).__name__}: "
                                  f"{err}){where_it_failed(err)}; a failure of one image belongs in its 'error' column"
                                  ) from err
            if "reward" not in table:
                raise RewardError(f"reward {name!r} returned a table without a 'reward' column (columns: "
                                  f"{list(table.columns)}): it must return one row per image with 'reward'")
            if len(table) != len(images):
                raise RewardError(f"reward {name!r} returned {len(table)} rows for {len(images)} images: it must "
                                  "return one row per image, in the order of the images it was given")
            values = pd.to_numeric(table["reward"], errors="coerce").to_numpy(dtype=float)
            failed = (table["error"].fillna("").astype(str).to_numpy(dtype=object) if "error" in table
                      else np.full(len(images), "", dtype=object))
            bad = ~np.isfinite(values)
            for j in np.flatnonzero(bad & (failed == "")):
                got = table["reward"].iloc[j]
                failed[j] = (f"reward {got!r} is text, not a number: score must return numbers" if isinstance(got, str)
                             else f"reward {got!r} is not a finite number")
            values = np.where(bad, 0.0, values)
            for j, text in enumerate(failed):
                if text:
                    errors[j].append(f"{name}: {text}")
            total += weight * values
            columns[name] = pd.Series(values)
            for col in table.columns:
                if col in ("reward", "error"):
                    continue
                columns[col if name == self.primary else f"{name}.{col}"] = table[col]
        out = pd.DataFrame({"reward": total, **columns})
        out["error"] = ["; ".join(e) for e in errors]
        return out


def as_table(out: object, name: str) -> pd.DataFrame:
    """A reward's output as a table: a DataFrame, a mapping of columns, or the rewards alone as one sequence."""
    if isinstance(out, pd.DataFrame):
        return out.reset_index(drop=True)
    if isinstance(out, dict):
        return pd.DataFrame(out)
    values = out.detach().float().cpu().numpy() if hasattr(out, "detach") else np.asarray(out, dtype=object)
    if values.ndim == 1:
        return pd.DataFrame({"reward": values})
    raise RewardError(f"reward {name!r} returned {type(out).__name__}: it must return a pandas DataFrame with one row "
                      "per image and a 'reward' column (or the rewards as one sequence)")


def part_means(scores: pd.DataFrame, names: Sequence[str]) -> dict[str, float]:
    """The mean of each weighted part's column (``reward_<name>``) where the table has it."""
    return {f"reward_{n}": float(scores[n].mean()) for n in names if n in scores and n != "reward"}
