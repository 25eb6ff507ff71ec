"""What every judge returns: 1–5 scores on alignment, coherence and style (method page §6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from PIL import Image

SCORE_MIN, SCORE_MAX = 1.0, 5.0


@dataclass(frozen=True)
class JudgeScores:
    alignment: float
    coherence: float
    style: float

    def as_dict(self) -> dict[str, float]:
        return {"alignment": self.alignment, "coherence": self.coherence, "style": self.style}


class Judge(Protocol):
    def score(self, images: list[Image.Image], prompts: list[str], targets: list[str]) -> list[JudgeScores]: ...
