"""Training curves over checkpoints: the hacking trend flag and the plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def slope(values: list[float] | np.ndarray) -> float:
    """Least-squares slope per checkpoint."""
    y = np.asarray(values, dtype=np.float64)
    return float(np.polyfit(np.arange(len(y)), y, 1)[0]) if len(y) >= 2 else 0.0


def hacking_trend(curve: pd.DataFrame, window: int) -> bool:
    """Reward rising while the corrected score falls over the last ``window`` checkpoints."""
    tail = curve.sort_values("step").tail(window)
    if len(tail) < window:
        return False
    return slope(tail["reward"]) > 0 and slope(tail["corrected"]) < 0


def best_step(curve: pd.DataFrame, keep: str) -> int:
    """The checkpoint to keep: best corrected score (ties: the later) or the last one.

    Checkpoints without a corrected score (every judge answer missing) are passed over; with none scored, the last.
    """
    trained = curve[curve["step"] > 0].sort_values("step")
    if trained.empty:
        raise ValueError("no trained checkpoint was evaluated: lower evaluate.checkpoint_every or raise train.steps")
    if keep == "last":
        return int(trained["step"].iloc[-1])
    scored = trained[trained["corrected"].notna()]  # a checkpoint the judge never answered for has no corrected score
    if scored.empty:
        return int(trained["step"].iloc[-1])
    return int(scored.loc[scored["corrected"][::-1].idxmax(), "step"])


def plot_curves(curve: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Reward and corrected score against step, with the base model's level dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = curve.sort_values("step")
    base = curve[curve["step"] == 0]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key in zip(axes, ("reward", "corrected")):
        ax.plot(curve["step"], curve[key], marker="o", label="trained")
        if not base.empty:
            ax.axhline(float(base[key].iloc[0]), linestyle="--", color="grey", label="base")
        ax.set_xlabel("train step")
        ax.set_title(key)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
