"""The built-in GenEval world: flat shapes in flat colours on black, laid out as a GenEval prompt asks.

Scenes are drawn with PIL from a record's metadata: the included objects (counts, colours, relative
positions), never touching, at random places. Because the world is synthetic its exact detector can
read a scene back from the pixels: each pixel takes its nearest palette colour, connected blobs of one
colour are objects, and each blob's class is the shape whose clean drawing at the blob's box overlaps it best.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from gdro_core.tasks.geneval_rules import Detection, relative_position

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (60, 100, 250), "yellow": (235, 220, 40),
    "orange": (245, 140, 20), "purple": (150, 60, 200), "pink": (245, 130, 190), "white": (245, 245, 245),
    "brown": (140, 80, 30),
}
"""Colours the world can draw (GenEval's colour names); black is the background."""

SHAPES = ("square", "circle", "triangle", "cross", "diamond")
BACKGROUND = (0, 0, 0)
PLACEMENT_TRIES = 200


class WorldError(ValueError):
    """A world or scene request the built-in GenEval world cannot draw."""


@dataclass(frozen=True)
class WorldSpec:
    height: int
    width: int
    object_size: int
    jitter: int
    classes: tuple[str, ...]
    colors: tuple[str, ...]
    grid: int = 0

    def __post_init__(self) -> None:
        if self.grid and (self.object_size + self.jitter > self.grid - 1 or self.grid > min(self.height, self.width)):
            raise WorldError(f"geneval.world.grid={self.grid} needs object_size + jitter <= grid - 1 (a free pixel "
                             f"between neighbours) and grid <= the canvas side; got object_size={self.object_size}, "
                             f"jitter={self.jitter} on {self.width}x{self.height}")
        unknown = [c for c in self.classes if c not in SHAPES]
        if unknown:
            raise WorldError(f"the built-in GenEval world draws {list(SHAPES)}; it cannot draw {unknown} "
                             "(set geneval.classes, or use geneval.detector.kind: mask2former with a real model)")
        bad = [c for c in self.colors if c not in PALETTE]
        if bad:
            raise WorldError(f"the built-in GenEval world's colours are {list(PALETTE)}; it cannot draw {bad}")


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


@dataclass(frozen=True)
class Placed:
    shape: str
    color: str
    box: tuple[int, int, int, int]


def _random_box(spec: WorldSpec, rng: random.Random) -> tuple[int, int, int, int]:
    s = spec.object_size + rng.randint(-spec.jitter, spec.jitter) if spec.jitter else spec.object_size
    s = max(3, min(s, spec.width, spec.height))
    if spec.grid:  # a random cell, a random place inside it that leaves its last row and column free
        cx, cy = rng.randrange(spec.width // spec.grid), rng.randrange(spec.height // spec.grid)
        x0 = cx * spec.grid + rng.randint(0, spec.grid - 1 - s)
        y0 = cy * spec.grid + rng.randint(0, spec.grid - 1 - s)
    else:
        x0, y0 = rng.randint(0, spec.width - s), rng.randint(0, spec.height - s)
    return x0, y0, x0 + s - 1, y0 + s - 1


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int = 1) -> bool:
    return a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1]


def layout(metadata: Mapping, spec: WorldSpec, rng: random.Random, position_threshold: float = 0.1) -> list[Placed]:
    """Objects that satisfy ``metadata``'s include clauses (and its exclude clauses, by drawing nothing more)."""
    for _ in range(PLACEMENT_TRIES):
        placed: list[Placed] = []
        groups: list[list[Placed]] = []
        ok = True
        for req in metadata["include"]:
            group = []
            for _ in range(req["count"]):
                color = req.get("color") or rng.choice(spec.colors)
                for _ in range(PLACEMENT_TRIES):
                    box = _random_box(spec, rng)
                    if not all(_apart(box, p.box) for p in placed):
                        continue
                    if "position" in req:
                        rel, g = req["position"]
                        if not all(rel in relative_position(Detection(box), Detection(t.box), position_threshold)
                                   for t in groups[g]):
                            continue
                    break
                else:
                    ok = False
                    break
                obj = Placed(req["class"], color, box)
                placed.append(obj)
                group.append(obj)
            if not ok:
                break
            groups.append(group)
        if ok:
            return placed
    raise WorldError(f"cannot lay out {metadata} on a {spec.width}x{spec.height} canvas; enlarge geneval.world")


def render_scene(objects: Sequence[Placed], spec: WorldSpec) -> Image.Image:
    img = Image.new("RGB", (spec.width, spec.height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        draw_shape(draw, o.shape, o.box, PALETTE[o.color])
    return img


def render_antialiased(objects: Sequence[Placed], spec: WorldSpec, factor: int, rng: random.Random) -> Image.Image:
    """The same scene drawn ``factor`` times larger at a random sub-pixel offset and area-averaged to the canvas.

    This is how a faithful generator may draw a scene at this resolution (partial-coverage edge pixels,
    shapes off the pixel grid by less than a pixel); the pixel judge takes its references from it, so
    edge softness within that range is not counted as incoherence. ``factor`` 1 is ``render_scene``.
    """
    if factor == 1:
        return render_scene(objects, spec)
    dx, dy = rng.randrange(factor) - factor // 2, rng.randrange(factor) - factor // 2
    big = Image.new("RGB", (spec.width * factor, spec.height * factor), BACKGROUND)
    draw = ImageDraw.Draw(big)
    for o in objects:
        x0, y0, x1, y1 = o.box
        draw_shape(draw, o.shape, (x0 * factor + dx, y0 * factor + dy, (x1 + 1) * factor - 1 + dx,
                                   (y1 + 1) * factor - 1 + dy), PALETTE[o.color])
    return big.resize((spec.width, spec.height), Image.BOX)


def to_array(images: Sequence[Image.Image]) -> np.ndarray:
    """float32 (n, 3, H, W) in [-1, 1], the built-in model's pixel space."""
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) for im in images]) / 127.5 - 1.0


class ExactDetector:
    """The built-in world's detector: palette colours, connected blobs, best-overlapping shape.

    Confidence is the blob's overlap (IoU) with the clean drawing of its class at its box: 1 for a clean
    render, lower for a smeared or misshapen one, so GenEval's confidence thresholds keep their meaning.
    """

    def __init__(self, classes: Sequence[str], colors: Sequence[str], min_pixels: int, tolerance: float):
        self.classes, self.colors = tuple(classes), tuple(colors)
        self.min_pixels, self.tolerance = min_pixels, tolerance
        self.refs = np.array([BACKGROUND, *(PALETTE[c] for c in self.colors)], dtype=np.float32)

    def detect(self, image: Image.Image) -> dict[str, list[Detection]]:
        x = np.asarray(image.convert("RGB"), dtype=np.float32)
        dist = np.linalg.norm(x[:, :, None, :] - self.refs[None, None], axis=-1)
        nearest = dist.argmin(-1)
        nearest[dist.min(-1) > self.tolerance] = 0  # off-palette pixels are not part of any object
        out: dict[str, list[Detection]] = {}
        for k, color in enumerate(self.colors, start=1):
            labels, n = ndimage.label(nearest == k)
            for i, sl in enumerate(ndimage.find_objects(labels), start=1):
                blob = labels[sl] == i
                if blob.sum() < self.min_pixels:
                    continue
                h, w = blob.shape
                ious = [self._iou(blob, shape_mask(c, w, h)) for c in self.classes]
                best = int(np.argmax(ious))
                box = (sl[1].start, sl[0].start, sl[1].stop - 1, sl[0].stop - 1)
                out.setdefault(self.classes[best], []).append(Detection(box, float(ious[best]), color))
        return out

    @staticmethod
    def _iou(a: np.ndarray, b: np.ndarray) -> float:
        union = np.logical_or(a, b).sum()
        return float(np.logical_and(a, b).sum() / union) if union else 0.0
