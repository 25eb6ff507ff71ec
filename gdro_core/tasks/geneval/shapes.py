"""The shapes of the built-in GenEval world: its palette and how each shape fills a box.

Both sides of the world use these: :mod:`.world` draws scenes with them, and the exact detector
(:mod:`.detectors`) reads a scene back by the same palette and clean shape drawings.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (60, 100, 250), "yellow": (235, 220, 40),
    "orange": (245, 140, 20), "purple": (150, 60, 200), "pink": (245, 130, 190), "white": (245, 245, 245),
    "brown": (140, 80, 30),
}
"""Colours the world can draw (GenEval's colour names); black is the background."""

SHAPES = ("square", "circle", "triangle", "cross", "diamond")
BACKGROUND = (0, 0, 0)


class WorldError(ValueError):
    """A world or scene request the built-in GenEval world cannot draw."""


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    """``shape`` filling the inclusive pixel box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":
        w, h = (x1 - x0 + 1) / 3, (y1 - y0 + 1) / 3
        top, left = round(y0 + h), round(x0 + w)
        draw.rectangle((x0, top, x1, max(top, round(y1 - h))), fill=fill)
        draw.rectangle((left, y0, max(left, round(x1 - w)), y1), fill=fill)
    else:
        raise WorldError(f"unknown shape {shape!r}; the world draws {list(SHAPES)}")


@lru_cache(maxsize=4096)
def shape_mask(shape: str, w: int, h: int) -> np.ndarray:
    """The clean drawing of ``shape`` filling a w x h box, as a boolean mask."""
    img = Image.new("L", (w, h), 0)
    draw_shape(ImageDraw.Draw(img), shape, (0, 0, w - 1, h - 1), 255)
    return np.asarray(img) > 127
