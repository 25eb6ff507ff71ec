"""The built-in GenEval world's pixel judge: coherence and style against clean scene renders.

- coherence: is it a clean flat-colour scene of well-formed objects? Penalises pixels that are neither
  background nor a palette colour (smear, blended colours) and speckle (blobs too small to be an
  object), and misshapen objects (``shape_fidelity``: per image, the mean overlap of each object with
  the clean drawing of the shape it resembles most, whatever the prompt asked), beyond the references.
- style: does it look like the world's scenes? Foreground coverage, colour saturation and edge
  sharpness, each as a z-score against clean renders.
- alignment: the detector's Flow-GRPO credit for the prompt, on the judge's scale. With
  ``judge.task: geneval`` û leaves alignment out, as the paper does for GenEval.

Calibration: every statistic is a z-score against the references (the world's scenes drawn
pixel-aligned and anti-aliased at sub-pixel offsets, the range a faithful drawing spans), and a
dimension has lost half its score (3 of 5) at ``z_scale``. Coherence is one-sided: fewer artefacts
or better-formed objects than the references is no flaw, and a scene is as coherent as its worst
flaw (the lower of the two); style is the mean over its features. Its spread is floored at one pixel's share of the canvas, so
references without any artefact cannot make a single stray pixel a full failure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from gdro_core.evaluation.judge_scores import SCORE_MAX, SCORE_MIN, JudgeScores
from gdro_core.tasks.geneval.shapes import PALETTE
from gdro_core.tasks.geneval.world import WorldSpec


@dataclass(frozen=True)
class SceneJudgeConfig:
    palette: tuple[tuple[int, int, int], ...]  # object colours; black is the background
    tolerance: float = 60.0  # RGB distance within which a pixel counts as a palette colour
    foreground: float = 0.25  # max channel above which a pixel is foreground
    speck_pixels: int = 3  # blobs this small cannot be an object (the task derives it from the object size)
    z_scale: float = 3.0  # z-score at which a dimension has lost half its score


def _to_score(quality: float) -> float:
    return SCORE_MIN + (SCORE_MAX - SCORE_MIN) * float(np.clip(quality, 0.0, 1.0))


def _quality(z: np.ndarray | float, z_scale: float) -> float:
    """1 at z = 0, one half at |z| = z_scale, falling as 1 / (1 + (z / z_scale)²)."""
    return float(np.mean(1.0 / (1.0 + (np.asarray(z) / z_scale) ** 2)))


class SceneJudge:
    """Reference statistics come from the world's clean renders; ``align(images, targets)`` gives credit in [0, 1]."""

    def __init__(self, cfg: SceneJudgeConfig, references: Sequence[Image.Image],
                 align: Callable[[list[Image.Image], list[str]], Sequence[float]],
                 shape_fidelity: Callable[[list[Image.Image]], Sequence[float]] | None = None):
        self.cfg, self.align, self.shape_fidelity = cfg, align, shape_fidelity
        self.refs = np.array([(0, 0, 0), *cfg.palette], dtype=np.float32)
        arrays = [self._unit(im) for im in references]
        feats = np.stack([self.style_features(x) for x in arrays])
        self.style_mean, self.style_std = feats.mean(0), feats.std(0) + 1e-6
        arte = np.array([self.artefact_fraction(x) for x in arrays])
        one_pixel = 1.0 / arrays[0][:, :, 0].size
        self.artefact_ref, self.artefact_scale = float(arte.mean()), max(float(arte.std()), one_pixel)
        if shape_fidelity is not None:
            fid = np.asarray(shape_fidelity(list(references)), dtype=np.float64)
            self.fidelity_ref, self.fidelity_scale = float(fid.mean()), float(fid.std() + 1e-6)

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
        fidelity = list(self.shape_fidelity(images)) if self.shape_fidelity is not None else [None] * len(images)
        out = []
        for im, c, f in zip(images, credit, fidelity):
            x = self._unit(im)
            z_coh = [max(0.0, self.artefact_fraction(x) - self.artefact_ref) / self.artefact_scale]
            if f is not None:
                z_coh.append(max(0.0, self.fidelity_ref - f) / self.fidelity_scale)
            coherence = _to_score(min(_quality(z, self.cfg.z_scale) for z in z_coh))  # its worst flaw
            z = (self.style_features(x) - self.style_mean) / self.style_std
            style = _to_score(_quality(z, self.cfg.z_scale))
            out.append(JudgeScores(_to_score(c), coherence, style))
        return out


def scene_judge_config(spec: WorldSpec, geneval, judge_params) -> SceneJudgeConfig:
    """The judge's constants from the world and the ``geneval`` and ``judge`` params sections. A speck is a blob
    no larger than a cross's arm square ((smallest object side / 3)²): no shape is that small."""
    smallest = max(spec.object_size - spec.jitter, 3)
    return SceneJudgeConfig(tuple(PALETTE[c] for c in geneval.colors), geneval.detector.palette_tolerance,
                            speck_pixels=int((smallest / 3) ** 2), z_scale=judge_params.z_scale)
