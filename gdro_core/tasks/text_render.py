"""Renders the built-in world's images: the target text drawn with a font shipped by matplotlib."""

from __future__ import annotations

import random
from functools import lru_cache

import numpy as np
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont


@lru_cache(maxsize=8)
def font(size: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans Bold, which matplotlib bundles, so every machine renders the same glyphs."""
    path = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans", weight="bold"))
    return ImageFont.truetype(path, size)


def render_text(text: str, height: int, width: int, font_size: int, offset: tuple[int, int] = (0, 0)) -> Image.Image:
    """White text, centred (plus ``offset``), on a black grayscale canvas."""
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    f = font(font_size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=f)
    x = (width - (right - left)) / 2 - left + offset[0]
    y = (height - (bottom - top)) / 2 - top + offset[1]
    draw.text((x, y), text, fill=255, font=f)
    return img


def render_batch(texts: list[str], height: int, width: int, font_size: int, jitter: int, rng: random.Random) -> np.ndarray:
    """Renders as float32 in [-1, 1], shape (n, 1, H, W), with random offsets up to ``jitter``."""
    out = np.empty((len(texts), 1, height, width), dtype=np.float32)
    for i, t in enumerate(texts):
        off = (rng.randint(-jitter, jitter), rng.randint(-jitter, jitter)) if jitter else (0, 0)
        out[i, 0] = np.asarray(render_text(t, height, width, font_size, off), dtype=np.float32) / 127.5 - 1.0
    return out
