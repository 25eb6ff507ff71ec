"""The GenEval reward: a detector's objects judged by GenEval's rules, one row per image.

The reward table holds, per image: ``score`` (Flow-GRPO's partial credit), ``correct`` (GenEval's per-prompt
0/1), ``strict`` (Flow-GRPO's exact-count 0/1) and ``reward`` (``score`` or ``correct``, as
``geneval.reward`` says). Summaries add GenEval's per-tag table (``tag.<tag>``) and its overall score
(``geneval``, the mean of the tag means).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import pandas as pd
from PIL import Image

from gdro_core.rewards.base import RewardError
from gdro_core.tasks.geneval.detectors import Detector
from gdro_core.tasks.geneval.prompts import GenEvalPrompt
from gdro_core.tasks.geneval.rules import Rules, colour_targets, judge_detections, tag_summary

Progress = Callable[[int, int], None]
SUMMARY = ("reward", "score", "correct", "strict", "alignment", "coherence", "style", "u_hat", "corrected")


def make_rules(geneval) -> Rules:
    """GenEval's evaluation-script constants from the ``geneval.detector`` params."""
    d = geneval.detector
    return Rules(d.threshold, d.counting_threshold, d.max_objects, d.nms_threshold, d.position_threshold)


def reward_table(
    images: list[Image.Image], records: Sequence[GenEvalPrompt], detector: Detector, rules: Rules, batch_size: int,
    reward: str, progress: Progress | None = None,
) -> pd.DataFrame:
    """Columns reward (the ``reward`` column's value), score, correct, strict, tag and reason for each image."""
    rows = []
    for start in range(0, len(images), batch_size):
        chunk, recs = images[start : start + batch_size], records[start : start + batch_size]
        checks = [partial(colour_targets, metadata=rec.metadata, rules=rules) for rec in recs]
        for dets, rec in zip(detector.detect(chunk, checks), recs):
            v = judge_detections(dets, rec.metadata, rules)
            rows.append({"score": v.score, "correct": float(v.correct), "strict": float(v.strict),
                         "tag": rec.tag, "reason": "; ".join(v.reasons)})
        if progress:
            progress(min(start + batch_size, len(images)), len(images))
    table = pd.DataFrame.from_records(rows, columns=["score", "correct", "strict", "tag", "reason"])
    table.insert(0, "reward", table[reward].astype(float) if len(table) else [])
    return table


COMPOSITIONAL = ("counting", "colors", "position", "color_attr")
"""The tags that bind an attribute (a count, a colour, a place) to an object: ``compositional`` is their mean."""


def summarise(scores: pd.DataFrame, clean_coherence: float | None = None) -> dict[str, float]:
    """Means of the reward, its parts and the judge columns, plus GenEval's per-tag table, its overall score and
    the ``compositional`` tags' mean. With judge coherence and ``clean_coherence``: the share of images at or above
    it (``clean_share``) and GenEval on those alone (``geneval_clean``), so a gain that only makes images cleaner
    shows as one in ``clean_share``, not in ``geneval_clean``."""
    out = {k: float(scores[k].mean()) for k in SUMMARY if k in scores}
    if "tag" in scores and len(scores):
        out |= tag_summary(list(scores["tag"]), list(scores["correct"]))
        present = [f"tag.{t}" for t in COMPOSITIONAL if f"tag.{t}" in out]
        if present:
            out["compositional"] = float(np.mean([out[k] for k in present]))
        if clean_coherence is not None and "coherence" in scores:
            clean = scores[scores["coherence"] >= clean_coherence]
            out["clean_share"] = len(clean) / len(scores)
            if len(clean):
                out["geneval_clean"] = tag_summary(list(clean["tag"]), list(clean["correct"]))["geneval"]
    return out


def shape_fidelity(detector: Detector, images: list[Image.Image]) -> list[float]:
    """Mean detector confidence (overlap with the closest clean shape) over an image's objects; 0 if none."""
    out = []
    for found in detector.detect(images, [lambda dets: {}] * len(images)):  # confidences only: no colour needed
        conf = [d.confidence for dets in found.values() for d in dets]
        out.append(float(np.mean(conf)) if conf else 0.0)
    return out


class GenEvalReward:
    """The GenEval reward as a reward of the rewards seam (``rewards.weights: {geneval: ...}``); options: the
    ``geneval`` section of params.yaml."""

    name = "geneval"
    needs_world = False

    def __init__(self, params, detector: Detector | None = None):
        from gdro_core.tasks.geneval.detectors import make_detector

        self.cfg = params.geneval
        self.rules = make_rules(self.cfg)
        self.detector = detector if detector is not None else make_detector(self.cfg)

    @classmethod
    def from_params(cls, params, options: dict) -> GenEvalReward:
        if options:
            raise RewardError("the geneval reward takes its options from the `geneval` section, not "
                             "rewards.options.geneval")
        return cls(params)

    def score(self, images: list[Image.Image], records: Sequence[GenEvalPrompt],
              progress: Progress | None = None) -> pd.DataFrame:
        return reward_table(list(images), records, self.detector, self.rules, self.cfg.detector.batch_size,
                            self.cfg.reward, progress)
