"""The GenEval world's pixel judge is calibrated on the world it judges: clean scenes score near the top,
scenes with misshapen objects (what a briefly pretrained base draws) in the middle, and blurred, noisy or
smeared scenes lower; its statistics are z-scores against the references, so no single pixel decides."""

import random

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from gdro_core.evaluation.corrected_score import judge_mean
from gdro_core.params import parse_params
from gdro_core.tasks.geneval.prompts import all_prompts
from gdro_core.tasks.geneval.world import layout, render_antialiased, render_scene
from gdro_core.tasks.registry import make_task

# the demo's world (params-geneval.yaml): 16x16 canvas, 2x2 cells, 7-pixel shapes
WORLD = {"height": 16, "width": 16, "grid": 8, "object_size": 7, "jitter": 0}
PARAMS = {"task": "geneval", "prompts": {"n_train": 40, "n_test": 24, "n_val": 8},
          "model": {"builtin": {"max_tokens": 52}}, "geneval": {"world": WORLD},
          "judge": {"reference_images": 64, "task": "geneval"}}


@pytest.fixture(scope="module")
def world():
    p = parse_params(PARAMS)
    task = make_task(p)
    rng = random.Random(7)
    records = [rng.choice(task.scene_prompts()) for _ in range(24)]
    clean = [task.render(r, rng) for r in records]
    return task, task.pixel_judge(p.judge), records, clean


def _u_hat(judge, images, records) -> float:
    scores = judge.score(images, [r.prompt for r in records], [r.target for r in records])
    return float(np.mean([judge_mean(s.as_dict(), "geneval") for s in scores]))


def _misshapen(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Lumpy objects in flat colours, like the demo's base draws (mean shape overlap about 0.8, the base's
    0.82): a tenth of the objects' edge pixels dropped, a tenth of the pixels around them grown."""
    x = np.asarray(image).copy()
    fg = x.max(-1) > 0
    edge = np.argwhere(fg & ~ndimage.binary_erosion(fg))
    ring = np.argwhere(ndimage.binary_dilation(fg) & ~fg)
    for i, j in ring[rng.random(len(ring)) < 0.1]:  # grow: take a foreground neighbour's colour
        ni, nj = min(((a, b) for a, b in edge), key=lambda e: abs(e[0] - i) + abs(e[1] - j))
        x[i, j] = x[ni, nj]
    for i, j in edge[rng.random(len(edge)) < 0.1]:
        x[i, j] = 0
    return Image.fromarray(x)


def _blur(image: Image.Image, sigma: float = 1.0) -> Image.Image:
    x = np.asarray(image, dtype=np.float32)
    return Image.fromarray(np.stack([ndimage.gaussian_filter(x[..., c], sigma) for c in range(3)], -1).round()
                           .astype(np.uint8))


def _noise(image: Image.Image, sd: float = 0.2) -> Image.Image:
    x = np.asarray(image, dtype=np.float32) + np.random.default_rng(0).normal(0, sd * 255, (16, 16, 3))
    return Image.fromarray(np.clip(x, 0, 255).round().astype(np.uint8))


def _smear(image: Image.Image) -> Image.Image:
    x = np.asarray(image, dtype=np.float32)
    return Image.fromarray(((x + np.roll(x, 1, 1) + np.roll(x, 2, 1)) / 3).round().astype(np.uint8))


def test_clean_scenes_beat_misshapen_ones_which_beat_degraded_ones(world):
    task, judge, records, clean = world
    rng = np.random.default_rng(0)
    base_like = [_misshapen(im, rng) for im in clean]
    u_clean, u_base = _u_hat(judge, clean, records), _u_hat(judge, base_like, records)
    degraded = {name: _u_hat(judge, [f(im) for im in clean], records)
                for name, f in (("blur", _blur), ("noise", _noise), ("smear", _smear))}
    assert u_clean > 4.5, u_clean
    assert 3.0 <= u_base < u_clean - 0.4, (u_base, u_clean)
    for name, u in degraded.items():
        assert u < u_base, (name, u, u_base)


def test_antialiased_scenes_and_a_stray_pixel_keep_a_high_score(world):
    """Edge softness a faithful drawing has, or one stray pixel, is no incoherence (clean references have no
    artefact at all, so an unfloored spread would make any single off-palette pixel a score of 1)."""
    task, judge, records, clean = world
    rng = random.Random(3)
    aa = [render_antialiased(layout(r.metadata, task._world(), rng), task._world(), 4, rng) for r in records]
    stray = []
    for im in clean:
        x = np.asarray(im).copy()
        x[0, 0] = (120, 60, 90)  # off every palette colour
        stray.append(Image.fromarray(x))
    assert _u_hat(judge, aa, records) > 4.0
    scores = judge.score(stray, [r.prompt for r in records], [r.target for r in records])
    assert min(s.coherence for s in scores) > 4.5


def test_antialiased_render_with_factor_one_is_the_worlds_drawing():
    p = parse_params(PARAMS)
    task = make_task(p)
    spec = task._world()
    rec = all_prompts("two_object", ["square", "circle"], ["red"], 2)[0]
    objects = layout(rec.metadata, spec, random.Random(0))
    same = render_antialiased(objects, spec, 1, random.Random(0))
    assert np.array_equal(np.asarray(same), np.asarray(render_scene(objects, spec)))
    soft = np.asarray(render_antialiased(objects, spec, 4, random.Random(1)))
    assert soft.shape == (16, 16, 3) and len(np.unique(soft.reshape(-1, 3), axis=0)) > 3  # partial-coverage edges
