"""The built-in GenEval world's pixel judge: coherence and style against clean scene renders.

- coherence: is it a clean flat-colour scene? Penalises pixels that are neither background nor a
  palette colour (smear, blended colours) and speckle (blobs too small to be an object), beyond what
  clean renders have.
- style: does it look like the world's scenes? Foreground coverage, colour saturation and edge
  sharpness, each as a z-score against clean renders.
- alignment: the detector's Flow-GRPO credit for the prompt, on the judge's scale. With
  ``judge.task: geneval`` û leaves alignment out, as the paper does for GenEval.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from gdro_core.evaluation.judge_scores import SCORE_MAX, SCORE_MIN, JudgeScores


@dataclass(frozen=True)
class SceneJudgeConfig:
    palette: tuple[tuple[int, int, int], ...]  # object colours; black is the background
    tolerance: float = 60.0  # RGB distance within which a pixel counts as a palette colour
    foreground: float = 0.25  # max channel above which a pixel is foreground
    speck_pixels: int = 3
    z_scale: float = 3.0


def _to_score(quality: float) -> float:
    return SCORE_MIN + (SCORE_MAX - SCORE_MIN) * float(np.clip(quality, 0.0, 1.0))


class SceneJudge:
    """Reference statistics come from the world's clean renders; ``align(images, targets)`` gives credit in [0, 1]."""

    def __init__(self, cfg: SceneJudgeConfig, references: Sequence[Image.Image],
                 align: Callable[[list[Image.Image], list[str]], Sequence[float]]):
        self.cfg, self.align = cfg, align
        self.refs = np.array([(0, 0, 0), *cfg.palette], dtype=np.float32)
        arrays = [self._unit(im) for im in references]
        feats = np.stack([self.style_features(x) for x in arrays])
        self.style_mean, self.style_std = feats.mean(0), feats.std(0) + 1e-6
        arte = np.array([self.artefact_fraction(x) for x in arrays])
        self.artefact_ref, self.artefact_scale = float(arte.mean()), float(arte.std() + arte.mean() + 1e-3)

    @staticmethod
    def _unit(image: Image.Image) -> np.ndarray:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0

    def artefact_fraction(self, x: np.ndarray) -> float:
        """Share of pixels off the palette (neither background nor an object colour) or in specks."""
        dist = np.linalg.norm(x[:, :, None, :] * 255.0 - self.refs[None, None], axis=-1).min(-1)
        off = dist > self.cfg.tolerance
        labels, n = ndimage.label(x.max(-1) > self.cfg.foreground)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        specks = np.isin(labels, np.flatnonzero(sizes <= self.cfg.speck_pixels) + 1)
        return float((off | specks).mean())

    def style_features(self, x: np.ndarray) -> np.ndarray:
        """Foreground coverage, mean saturation of the foreground, edge sharpness."""
        value = x.max(-1)
        fg = value > self.cfg.foreground
        sat = float(((value - x.min(-1)) / np.maximum(value, 1e-6))[fg].mean()) if fg.any() else 0.0
        grad = np.hypot(*np.gradient(value))
        sharp = float(grad[grad > 0.05].mean()) if (grad > 0.05).any() else 0.0
        return np.array([fg.mean(), sat, sharp], dtype=np.float64)

    def score(self, images: list[Image.Image], prompts: list[str], targets: list[str]) -> list[JudgeScores]:
        credit = list(self.align(images, targets))
        out = []
        for im, c in zip(images, credit):
            x = self._unit(im)
            excess = max(0.0, self.artefact_fraction(x) - self.artefact_ref)
            coherence = _to_score(1.0 - excess / (self.cfg.z_scale * self.artefact_scale))
            z = (self.style_features(x) - self.style_mean) / self.style_std
            style = _to_score(float(np.mean(1.0 / (1.0 + (z / self.cfg.z_scale) ** 2))))
            out.append(JudgeScores(_to_score(c), coherence, style))
        return out
