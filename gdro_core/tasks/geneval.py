"""The GenEval task behind the task seam: compositional prompts, GenEval's rules over a detector, the shapes world.

The reward table holds, per image: ``score`` (Flow-GRPO's partial credit), ``correct`` (GenEval's per-prompt
0/1), ``strict`` (Flow-GRPO's exact-count 0/1) and ``reward`` (``score`` or ``correct``, as
``geneval.reward`` says). Summaries add GenEval's per-tag table (``tag.<tag>``) and its overall score
(``geneval``, the mean of the tag means).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from gdro_core.tasks.base import Progress, words_of
from gdro_core.tasks.detectors import Detector, make_detector
from gdro_core.tasks.geneval_prompts import (
    GenEvalPrompt,
    all_prompts,
    generate_sets,
    metadata_sets,
    read_metadata,
    validate_sets,
    write_metadata,
)
from gdro_core.tasks.geneval_rules import Rules, judge_detections, tag_summary
from gdro_core.tasks.geneval_world import PALETTE, WorldSpec, layout, render_antialiased, render_scene, to_array

SUMMARY = ("reward", "score", "correct", "strict", "alignment", "coherence", "style", "u_hat", "corrected")
CEILING_SEED = 0


class GenEvalTask:
    name = "geneval"
    channels = 3

    def __init__(self, params, detector: Detector | None = None):
        self.params, self.cfg = params, params.geneval
        d = self.cfg.detector
        self.rules = Rules(d.threshold, d.counting_threshold, d.max_objects, d.nms_threshold, d.position_threshold)
        self.spec: WorldSpec | None = None
        self._detector = detector
        self._scenes: list[GenEvalPrompt] | None = None

    @property
    def detector(self) -> Detector:
        """Built on first use: real detectors load their weights only when something is scored."""
        if self._detector is None:
            self._detector = make_detector(self.cfg)
        return self._detector

    # prompt records
    def make_prompt_sets(self, root: Path = Path(".")) -> dict[str, list[GenEvalPrompt]]:
        """Read from ``geneval.metadata_dir`` (under ``root``) or generated; validated either way."""
        p = self.params.prompts
        if self.cfg.metadata_dir:
            where = self.cfg.metadata_dir
            sets = metadata_sets(Path(root) / self.cfg.metadata_dir, p.n_val)
        else:
            where = "generated GenEval prompt sets"
            sizes = {"train": p.n_train, "test": p.n_test, "val": p.n_val}
            sets = generate_sets(self.cfg.classes, self.cfg.colors, self.cfg.max_count, self.cfg.tags, sizes, p.seed)
        validate_sets(sets, self.params, where)
        return sets

    def write_prompts(self, path: Path, records: Sequence[GenEvalPrompt]) -> None:
        write_metadata(path, records)

    def read_prompts(self, path: Path) -> list[GenEvalPrompt]:
        return read_metadata(path)

    def record(self, prompt: str, target: str) -> GenEvalPrompt:
        return GenEvalPrompt.from_target(prompt, target)

    # reward
    def reward(self, images: list[Image.Image], records: Sequence[GenEvalPrompt],
               progress: Progress | None = None) -> pd.DataFrame:
        rows = []
        step = self.cfg.detector.batch_size
        for start in range(0, len(images), step):
            chunk = images[start : start + step]
            for dets, rec in zip(self.detector.detect(chunk), records[start : start + step]):
                v = judge_detections(dets, rec.metadata, self.rules)
                rows.append({"score": v.score, "correct": float(v.correct), "strict": float(v.strict),
                             "tag": rec.tag, "reason": "; ".join(v.reasons)})
            if progress:
                progress(min(start + step, len(images)), len(images))
        table = pd.DataFrame.from_records(rows, columns=["score", "correct", "strict", "tag", "reason"])
        table.insert(0, "reward", table[self.cfg.reward].astype(float) if len(table) else [])
        return table

    def summarise(self, scores: pd.DataFrame) -> dict[str, float]:
        out = {k: float(scores[k].mean()) for k in SUMMARY if k in scores}
        if "tag" in scores and len(scores):
            out |= tag_summary(list(scores["tag"]), list(scores["correct"]))
        return out

    def ceiling(self, records: Sequence[GenEvalPrompt]) -> dict[str, float]:
        rng = random.Random(CEILING_SEED)
        images = [self.render(r, rng) for r in records]
        return self.summarise(self.reward(images, records))

    # the built-in world
    def _world(self) -> WorldSpec:
        """Built on first use, so a real model with real classes never needs the shapes world."""
        if self.spec is None:
            w = self.cfg.world
            self.spec = WorldSpec(w.height, w.width, w.object_size, w.jitter, tuple(self.cfg.classes),
                                  tuple(self.cfg.colors), w.grid)
        return self.spec

    def render(self, record: GenEvalPrompt, rng: random.Random) -> Image.Image:
        """A clean scene for ``record``."""
        spec = self._world()
        return render_scene(layout(record.metadata, spec, rng, self.rules.position_threshold), spec)

    @property
    def world_shape(self) -> tuple[int, int]:
        return self.cfg.world.height, self.cfg.world.width

    def scene_prompts(self) -> list[GenEvalPrompt]:
        """Every prompt the world can caption: what the built-in model pretrains on."""
        if self._scenes is None:
            self._scenes = [r for t in self.cfg.tags
                            for r in all_prompts(t, self.cfg.classes, self.cfg.colors, self.cfg.max_count)]
        return self._scenes

    def pretrain_batch(self, n: int, cfg, rng: random.Random) -> tuple[np.ndarray, list[str]]:
        """Scenes of random prompts (tags equally likely), captioned with their prompts; some dropped, some
        mislabelled (``caption_noise``), some blurred (``low_quality_share``)."""
        from gdro_core.training.pretrain import degrade

        scenes = self.scene_prompts()
        by_tag: dict[str, list[GenEvalPrompt]] = {}
        for r in scenes:
            by_tag.setdefault(r.tag, []).append(r)
        tags = list(by_tag)
        records = [rng.choice(by_tag[rng.choice(tags)]) for _ in range(n)]
        images = to_array([self.render(r, rng) for r in records])
        captions = []
        for r in records:
            if rng.random() < cfg.cond_dropout:
                captions.append("")
            elif rng.random() < cfg.caption_noise:
                captions.append(rng.choice(scenes).prompt)
            else:
                captions.append(r.prompt)
        return degrade(images, cfg.low_quality_share, cfg.low_quality_blur, rng), captions

    def caption_words(self) -> list[str]:
        return words_of([r.prompt for r in self.scene_prompts()])

    def pixel_judge(self, judge_params):
        from gdro_core.evaluation.scene_judge import SceneJudge, SceneJudgeConfig

        """References: half the scenes as the world draws them, half anti-aliased at a random sub-pixel offset
        (``judge.reference_supersample``), so the judge's spreads span faithful drawings, not one rasteriser's.
        A speck is a blob no larger than a cross's arm square ((smallest object side / 3)²): no shape is that small.
        """
        rng = random.Random(CEILING_SEED)
        scenes = self.scene_prompts()
        spec = self._world()
        refs = []
        for i in range(judge_params.reference_images):
            objects = layout(rng.choice(scenes).metadata, spec, rng, self.rules.position_threshold)
            factor = judge_params.reference_supersample if i % 2 else 1
            refs.append(render_antialiased(objects, spec, factor, rng))
        smallest = max(spec.object_size - spec.jitter, 3)
        cfg = SceneJudgeConfig(tuple(PALETTE[c] for c in self.cfg.colors), self.cfg.detector.palette_tolerance,
                               speck_pixels=int((smallest / 3) ** 2),
                               z_scale=judge_params.z_scale)

        def align(images: list[Image.Image], targets: list[str]) -> list[float]:
            return list(self.reward(images, [self.record("", t) for t in targets])["score"])

        def shape_fidelity(images: list[Image.Image]) -> list[float]:
            """Mean detector confidence (overlap with the closest clean shape) over an image's objects; 0 if none."""
            out = []
            for found in self.detector.detect(images):
                conf = [d.confidence for dets in found.values() for d in dets]
                out.append(float(np.mean(conf)) if conf else 0.0)
            return out

        return SceneJudge(cfg, refs, align, shape_fidelity)
