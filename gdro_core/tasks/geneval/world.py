"""The built-in GenEval world: flat shapes in flat colours on black, laid out as a GenEval prompt asks.

Scenes are drawn with PIL from a record's metadata: the included objects (counts, colours, relative
positions), never touching, at random places. The same scenes are the built-in model's pretraining data
(:func:`scene_batch`), the ceiling's clean images and the pixel judge's references. The shapes and the
palette are :mod:`.shapes`, which the world's exact detector (:mod:`.detectors`) reads scenes back with.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from gdro_core.tasks.geneval.prompts import GenEvalPrompt
from gdro_core.tasks.geneval.rules import Detection, relative_position
from gdro_core.tasks.geneval.shapes import BACKGROUND, PALETTE, SHAPES, WorldError, draw_shape
from gdro_core.training.degrade import degrade

PLACEMENT_TRIES = 200
CEILING_SEED = 0
"""Seed of the clean scenes the ceiling and the pixel judge's references are drawn with."""


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


def world_spec(geneval) -> WorldSpec:
    """The world the ``geneval`` params section describes."""
    w = geneval.world
    return WorldSpec(w.height, w.width, w.object_size, w.jitter, tuple(geneval.classes), tuple(geneval.colors), w.grid)


def render(record: GenEvalPrompt, spec: WorldSpec, rng: random.Random, position_threshold: float) -> Image.Image:
    """A clean scene for ``record``."""
    return render_scene(layout(record.metadata, spec, rng, position_threshold), spec)


def clean_images(records: Sequence[GenEvalPrompt], spec: WorldSpec, position_threshold: float) -> list[Image.Image]:
    """Clean scenes of ``records`` drawn from the ceiling's seed: the best a model can draw for them."""
    rng = random.Random(CEILING_SEED)
    return [render(r, spec, rng, position_threshold) for r in records]


OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def misstated(record: GenEvalPrompt, spec: WorldSpec, max_count: int, rng: random.Random) -> GenEvalPrompt:
    """The scene of ``record`` with one attribute wrong, as a caption that misstates its image reads: another
    colour (colors), the two colours swapped (color_attr), one object more or fewer (counting), the relation
    reversed (position). Tags without such an attribute (single_object, two_object) come back unchanged."""
    include = [dict(c) for c in record.include]
    if record.tag == "colors":
        include[0]["color"] = rng.choice([c for c in spec.colors if c != include[0]["color"]])
    elif record.tag == "color_attr":
        include[0]["color"], include[1]["color"] = include[1]["color"], include[0]["color"]
    elif record.tag == "counting":
        n = include[0]["count"]
        include[0]["count"] = rng.choice([k for k in (n - 1, n + 1) if 1 <= k <= max_count])
    elif record.tag == "position":
        rel, g = include[1]["position"]
        include[1]["position"] = [OPPOSITE[rel], g]
    else:
        return record
    return GenEvalPrompt(record.prompt, record.tag, tuple(include), record.exclude)


def scene_batch(scenes: Sequence[GenEvalPrompt], spec: WorldSpec, position_threshold: float, n: int, cfg,
                rng: random.Random, max_count: int = 4) -> tuple[np.ndarray, list[str]]:
    """Scenes of random prompts among ``scenes`` (tags equally likely), captioned with their prompts; some
    dropped, some misstating one attribute of their scene (``attribute_errors``), some mislabelled
    (``caption_noise``), some blurred (``low_quality_share``), as ``pretrain`` params ``cfg`` say."""
    by_tag: dict[str, list[GenEvalPrompt]] = {}
    for r in scenes:
        by_tag.setdefault(r.tag, []).append(r)
    tags = list(by_tag)
    records = [rng.choice(by_tag[rng.choice(tags)]) for _ in range(n)]
    drawn = [misstated(r, spec, max_count, rng) if cfg.attribute_errors and rng.random() < cfg.attribute_errors else r
             for r in records]
    images = to_array([render(r, spec, rng, position_threshold) for r in drawn])
    captions = []
    for r in records:
        if rng.random() < cfg.cond_dropout:
            captions.append("")
        elif rng.random() < cfg.caption_noise:
            captions.append(rng.choice(scenes).prompt)
        else:
            captions.append(r.prompt)
    return degrade(images, cfg.low_quality_share, cfg.low_quality_blur, rng), captions


def reference_images(scenes: Sequence[GenEvalPrompt], spec: WorldSpec, n: int, supersample: int,
                     position_threshold: float) -> list[Image.Image]:
    """The pixel judge's references: half the scenes as the world draws them, half anti-aliased at a random
    sub-pixel offset (``supersample``), so the judge's spreads span faithful drawings, not one rasteriser's."""
    rng = random.Random(CEILING_SEED)
    refs = []
    for i in range(n):
        objects = layout(rng.choice(scenes).metadata, spec, rng, position_threshold)
        factor = supersample if i % 2 else 1
        refs.append(render_antialiased(objects, spec, factor, rng))
    return refs
