"""The built-in OCR world: target text drawn with a font shipped by matplotlib, and the pretraining batches
(rendered strings, some blurred, under their sometimes mislabelled captions) the built-in model learns from."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont

from gdro_core.tasks.ocr.prompts import random_string
from gdro_core.training.degrade import degrade

if TYPE_CHECKING:
    from gdro_core.params import Pretrain, World


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


def clean_images(targets: Sequence[str], world: World) -> list[Image.Image]:
    """The world's own clean renders of ``targets`` (centred): the ceiling's images."""
    return [render_text(t, world.height, world.width, world.font_size) for t in targets]


def random_text(world: World, rng: random.Random) -> str:
    return random_string(world.alphabet, world.min_len, world.max_len, rng)


def mislabel(text: str, world: World, rng: random.Random) -> str:
    """Another random string: a mislabelled image, as web captions often are, so the base sometimes ignores its prompt."""
    for _ in range(100):
        other = random_text(world, rng)
        if other != text:
            return other
    return text


def caption_batch(
    world: World, templates: list[str], cfg: Pretrain, n: int, rng: random.Random
) -> tuple[list[str], list[str]]:
    """Random target strings (what is drawn) and their captions (what the model is told)."""
    texts = [random_text(world, rng) for _ in range(n)]
    captions = []
    for t in texts:
        if rng.random() < cfg.cond_dropout:
            captions.append("")
            continue
        shown = mislabel(t, world, rng) if rng.random() < cfg.caption_noise else t
        captions.append(rng.choice(templates).format(text=shown))
    return texts, captions


def text_batch(
    world: World, templates: list[str]
) -> Callable[[int, Pretrain, random.Random], tuple[np.ndarray, list[str]]]:
    """The OCR world's batches: rendered strings, some blurred, under their (sometimes noisy) captions."""

    def batch(n: int, cfg: Pretrain, rng: random.Random) -> tuple[np.ndarray, list[str]]:
        texts, captions = caption_batch(world, templates, cfg, n, rng)
        clean = render_batch(texts, world.height, world.width, world.font_size, world.jitter, rng)
        return degrade(clean, cfg.low_quality_share, cfg.low_quality_blur, rng), captions

    return batch
