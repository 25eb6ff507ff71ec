"""The built-in OCR world's pixel judge: 1–5 on alignment, coherence and style (method page §6).

``PixelJudge`` is the built-in world's judge. It measures the three things honestly from pixels,
against the distribution of clean renders the base model was trained on:

- alignment: does the image show *the prompt's* text as the world draws it? The best normalised
  cross-correlation between the image and the clean render of the target over the render offsets.
  An OCR engine can read distorted, smeared or oversized glyphs; this cannot be fooled that way.
- coherence: is it a clean render at all? Penalises what a clean render never has: mid-grey
  smear (pixels neither ink nor background) and speckle (ink in tiny disconnected blobs).
- style: does the text look like the world's text? Ink coverage, text-box height and width and
  stroke sharpness, each as a z-score against clean renders.

Each measure maps to [1, 5] so that a clean render scores about 5 and û ≈ 3 marks "as good as
noise". All constants live in :class:`JudgeConfig`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from gdro_core.evaluation.judge_scores import SCORE_MAX, SCORE_MIN, JudgeScores
from gdro_core.tasks.ocr.prompts import random_string
from gdro_core.tasks.ocr.world import render_batch, render_text


@dataclass(frozen=True)
class JudgeConfig:
    height: int
    width: int
    font_size: int
    jitter: int
    alphabet: str
    min_len: int
    max_len: int
    reference_images: int = 256
    ink_threshold: float = 0.5  # fraction of full intensity that counts as ink
    midtone_low: float = 0.25
    midtone_high: float = 0.75
    speck_pixels: int = 3  # blobs this small are speckle, not glyph parts
    z_scale: float = 3.0  # z-score at which a style feature has lost half its score
    seed: int = 0


def _to_unit(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def _to_score(quality: float) -> float:
    """Quality in [0, 1] to the judge's [1, 5] scale."""
    return SCORE_MIN + (SCORE_MAX - SCORE_MIN) * float(np.clip(quality, 0.0, 1.0))


def style_features(x: np.ndarray, cfg: JudgeConfig) -> np.ndarray:
    """Ink coverage, text-box height and width (fractions of the image), stroke sharpness."""
    ink = x > cfg.ink_threshold
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    h = (rows[-1] - rows[0] + 1) / x.shape[0] if rows.size else 0.0
    w = (cols[-1] - cols[0] + 1) / x.shape[1] if cols.size else 0.0
    grad = np.hypot(*np.gradient(x))
    sharp = float(grad[ink].mean()) if ink.any() else 0.0
    return np.array([ink.mean(), h, w, sharp], dtype=np.float64)


def artefact_fraction(x: np.ndarray, cfg: JudgeConfig) -> float:
    """Share of pixels that are mid-grey smear or isolated speckle."""
    mid = (x > cfg.midtone_low) & (x < cfg.midtone_high)
    labels, n = ndimage.label(x > cfg.ink_threshold)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    specks = np.isin(labels, np.flatnonzero(sizes <= cfg.speck_pixels) + 1)
    return float((mid | specks).mean())


class PixelJudge:
    """The built-in world's judge; reference statistics come from the world's own clean renders."""

    def __init__(self, cfg: JudgeConfig):
        self.cfg = cfg
        rng = random.Random(cfg.seed)
        texts = [random_string(cfg.alphabet, cfg.min_len, cfg.max_len, rng) for _ in range(cfg.reference_images)]
        refs = (render_batch(texts, cfg.height, cfg.width, cfg.font_size, cfg.jitter, rng)[:, 0] + 1) / 2
        feats = np.stack([style_features(r, cfg) for r in refs])
        self.style_mean, self.style_std = feats.mean(0), feats.std(0) + 1e-6
        arte = np.array([artefact_fraction(r, cfg) for r in refs])
        self.artefact_ref, self.artefact_scale = float(arte.mean()), float(arte.std() + arte.mean() + 1e-6)

    def alignment(self, x: np.ndarray, target: str) -> float:
        """Best normalised cross-correlation with the target's clean render over the render offsets."""
        best = -1.0
        j = self.cfg.jitter
        for dx in range(-j, j + 1):
            for dy in range(-j, j + 1):
                ref = _to_unit(render_text(target, self.cfg.height, self.cfg.width, self.cfg.font_size, (dx, dy)))
                a, b = x - x.mean(), ref - ref.mean()
                denom = np.sqrt((a * a).sum() * (b * b).sum())
                best = max(best, float((a * b).sum() / denom) if denom > 0 else 0.0)
        return _to_score(best)

    def coherence(self, x: np.ndarray) -> float:
        excess = max(0.0, artefact_fraction(x, self.cfg) - self.artefact_ref)
        return _to_score(1.0 - excess / (self.cfg.z_scale * self.artefact_scale))

    def style(self, x: np.ndarray) -> float:
        z = (style_features(x, self.cfg) - self.style_mean) / self.style_std
        return _to_score(float(np.mean(1.0 / (1.0 + (z / self.cfg.z_scale) ** 2))))

    def score(self, images: list[Image.Image], prompts: list[str], targets: list[str]) -> list[JudgeScores]:
        out = []
        for im, target in zip(images, targets):
            x = _to_unit(im)
            out.append(JudgeScores(self.alignment(x, target), self.coherence(x), self.style(x)))
        return out


def pixel_judge_config(world, judge) -> JudgeConfig:
    """The pixel judge's configuration from the ``world`` and ``judge`` params sections."""
    return JudgeConfig(
        height=world.height, width=world.width, font_size=world.font_size, jitter=world.jitter,
        alphabet=world.alphabet, min_len=world.min_len, max_len=world.max_len,
        reference_images=judge.reference_images, z_scale=judge.z_scale,
    )
