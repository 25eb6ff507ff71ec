"""The corrected score (method page §6): reward discounted by a judge's view of quality."""

from __future__ import annotations

from collections.abc import Sequence

JUDGE_MIDPOINT = 3.0
OFFSET = 0.2
DIMENSIONS = {"ocr": ("alignment", "coherence", "style"), "geneval": ("coherence", "style"),
              "general": ("alignment", "coherence", "style")}


def judge_mean(scores: dict[str, float], task: str = "ocr") -> float:
    """û: mean judge score over the task's dimensions (GenEval drops alignment, which tracked hacking there)."""
    dims = DIMENSIONS[task]
    return sum(scores[d] for d in dims) / len(dims)


def corrected_score(reward: float, u_hat: float) -> float:
    """corrected = r · (û − 3) + 0.2."""
    return reward * (u_hat - JUDGE_MIDPOINT) + OFFSET


def mean_corrected(rewards: Sequence[float], u_hats: Sequence[float]) -> float:
    """Per-image corrected scores, averaged."""
    if len(rewards) != len(u_hats) or not rewards:
        raise ValueError("need one judge score per rewarded image")
    return sum(corrected_score(r, u) for r, u in zip(rewards, u_hats)) / len(rewards)
