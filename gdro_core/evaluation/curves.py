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


def tied_steps(images: pd.DataFrame, best: int, steps: list[int], tie_se: float) -> list[int]:
    """The steps whose corrected score is within ``tie_se`` paired standard errors of ``best``'s.

    ``images`` holds one row per validation image and step (``step``, ``image``, ``corrected``): every checkpoint
    is scored on the same prompts and seeds, so the per-image differences carry only the checkpoints' difference.
    """
    table = images.pivot(index="image", columns="step", values="corrected")
    out = []
    for s in steps:
        diff = (table[best] - table[s]).dropna() if s in table and best in table else pd.Series(dtype=float)
        if s == best or (len(diff) >= 2 and diff.mean() <= tie_se * diff.std(ddof=1) / np.sqrt(len(diff))):
            out.append(s)
    return out


def best_step(curve: pd.DataFrame, keep: str, images: pd.DataFrame | None = None, tie_se: float = 0.0) -> int:
    """The checkpoint to keep: the best corrected score (ties: the later) or the last one.

    With ``tie_se`` > 0 and per-image scores, the checkpoints whose corrected score the validation images cannot
    tell from the best (within ``tie_se`` paired standard errors) are tied, and the tied one with the highest
    reward is kept: the corrected score still rules out a hacked checkpoint, its noise no longer picks among the
    rest. Checkpoints without a corrected score (every judge answer missing) are passed over; with none scored,
    the last.
    """
    trained = curve[curve["step"] > 0].sort_values("step")
    if trained.empty:
        raise ValueError("no trained checkpoint was evaluated: lower evaluate.checkpoint_every or raise train.steps")
    if keep == "last":
        return int(trained["step"].iloc[-1])
    scored = trained[trained["corrected"].notna()]  # a checkpoint the judge never answered for has no corrected score
    if scored.empty:
        return int(trained["step"].iloc[-1])
    best = int(scored.loc[scored["corrected"][::-1].idxmax(), "step"])
    if tie_se <= 0 or images is None or images.empty:
        return best
    tied = scored[scored["step"].isin(tied_steps(images, best, [int(s) for s in scored["step"]], tie_se))]
    return int(tied.loc[tied["reward"][::-1].idxmax(), "step"])


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
