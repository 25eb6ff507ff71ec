"""A score table's summary: the means of its reward and judge columns, and how many images the judge missed."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

JUDGE_COLUMNS = ("alignment", "coherence", "style", "u_hat", "corrected")


def summarise(scores: pd.DataFrame, reward_columns: Sequence[str] = ("reward",)) -> dict[str, float]:
    """Means of ``reward_columns`` and the judge columns present; images the judge gave no answer for are left
    out of the judge means and counted as ``judge_missing``."""
    out = {k: float(scores[k].mean()) for k in (*reward_columns, *JUDGE_COLUMNS) if k in scores}
    if "u_hat" in scores:
        out["judge_missing"] = float(scores["u_hat"].isna().sum())
    return out
