"""GenEval's rules over given detections, as its evaluation script applies them (Ghosh et al. 2023).

Pure functions: a detector (Mask2Former + CLIP, or the built-in world's exact detector) turns an image
into :class:`Detection` lists per class; these rules turn detections and a prompt's metadata into

- ``correct``: GenEval's per-prompt 0/1 (``evaluate``): at least ``count`` of each included class
  (the most confident ``count`` are checked for colour and position), fewer than ``count`` of each
  excluded class;
- ``strict`` and ``score``: Flow-GRPO's training reward (``evaluate_reward`` of its GenEval reward
  server): exact counts, no exclude clauses, and a partial credit averaged over the clauses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Detection:
    """One detected object: its box (x0, y0, x1, y1) in pixels, its confidence and its colour (if classified)."""

    box: tuple[float, float, float, float]
    confidence: float = 1.0
    color: str | None = None


@dataclass(frozen=True)
class Rules:
    """GenEval's evaluation-script constants."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    nms_threshold: float = 1.0
    position_threshold: float = 0.1


@dataclass(frozen=True)
class Verdict:
    correct: bool  # GenEval's per-prompt correctness
    strict: bool  # Flow-GRPO's strict correctness (exact counts)
    score: float  # Flow-GRPO's partial credit: at most 1, negative when found > 2 x count (as in the reference)
    reasons: list[str] = field(default_factory=list)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""

    def area(x0: float, y0: float, x1: float, y1: float) -> float:
        return max(x1 - x0 + 1, 0) * max(y1 - y0 + 1, 0)  # GenEval's inclusive-pixel areas

    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a) + area(*b) - inter
    return inter / union if union else 0.0


def keep_detections(raw: Mapping[str, Sequence[Detection]], tag: str, rules: Rules) -> dict[str, list[Detection]]:
    """Per class: above the confidence threshold (the counting one for counting prompts), most confident first,
    at most ``max_objects``, then greedy non-maximum suppression at ``nms_threshold`` (1 keeps every box)."""
    threshold = rules.counting_threshold if tag == "counting" else rules.threshold
    kept: dict[str, list[Detection]] = {}
    for cls, dets in raw.items():
        order = sorted((d for d in dets if d.confidence > threshold), key=lambda d: -d.confidence)[: rules.max_objects]
        out: list[Detection] = []
        while order:
            best = order.pop(0)
            out.append(best)
            if rules.nms_threshold < 1:
                order = [d for d in order if iou(best.box, d.box) < rules.nms_threshold]
        if out:
            kept[cls] = out
    return kept


def colour_targets(raw: Mapping[str, Sequence[Detection]], metadata: Mapping, rules: Rules
                   ) -> dict[str, list[Detection]]:
    """The detections whose colour GenEval classifies: those kept (threshold, ``max_objects``, NMS) of each class
    a colour clause names. No other detection's colour can change a verdict."""
    kept = keep_detections(raw, metadata.get("tag", ""), rules)
    classes = {req["class"] for req in metadata.get("include", []) if "color" in req}
    return {cls: kept[cls] for cls in sorted(classes) if cls in kept}


def relative_position(a: Detection, b: Detection, threshold: float) -> set[str]:
    """Relations of ``a`` to ``b``: the centre offset, shrunk by ``threshold`` times the two boxes' sizes, must point
    mostly left/right/above/below (its component over the offset's length beyond 0.5)."""
    boxes = np.array([a.box, b.box], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def _position_ok(found: Sequence[Detection], targets: Sequence[Detection], rel: str, threshold: float) -> bool:
    return all(rel in relative_position(o, t, threshold) for o in found for t in targets)


def geneval_correct(detected: Mapping[str, Sequence[Detection]], metadata: Mapping, rules: Rules,
                    reasons: list[str] | None = None) -> bool:
    """GenEval's ``evaluate``: include clauses AND-ed, exclude clauses OR-ed."""
    reasons = reasons if reasons is not None else []
    correct = True
    groups: list[Sequence[Detection] | None] = []
    for req in metadata.get("include", []):
        cls, count = req["class"], req["count"]
        found = list(detected.get(cls, []))[:count]
        matched = True
        if len(found) < count:
            matched = False
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in req:
                n = [d.color for d in found].count(req["color"])
                if n < count:
                    matched = False
                    reasons.append(f"expected {req['color']} {cls}>={count}, found {n} {req['color']}")
            if "position" in req and matched:
                rel, group = req["position"]
                if groups[group] is None:
                    matched = False
                    reasons.append(f"no target for {cls} to be {rel}")
                elif not _position_ok(found, groups[group], rel, rules.position_threshold):
                    matched = False
                    reasons.append(f"expected {cls} {rel} target")
        correct &= matched
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        n = len(detected.get(req["class"], []))
        if n >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return correct


def flow_grpo_score(detected: Mapping[str, Sequence[Detection]], metadata: Mapping, rules: Rules) -> tuple[bool, float]:
    """Flow-GRPO's ``evaluate_reward``: (strict correctness, partial credit).

    Each include clause adds 1 − |count − found| / count; a colour clause adds the same over the objects of
    that colour; a position clause adds 1 when every found object stands in the relation to every target,
    else 0 and then 1 (the reference appends the 1 after a failed check too; kept, since it is the score
    Flow-GRPO trains on). A count mismatch adds 0 for a colour or position clause. Exclude clauses are not
    scored. The credit is the mean of the added terms.
    """
    strict = True
    terms: list[float] = []
    groups: list[Sequence[Detection] | None] = []
    for req in metadata.get("include", []):
        cls, count = req["class"], req["count"]
        found = list(detected.get(cls, []))
        matched = True
        terms.append(1 - abs(count - len(found)) / count)
        if len(found) != count:
            matched = False
            if "color" in req or "position" in req:
                terms.append(0.0)
        else:
            if "color" in req:
                n = [d.color for d in found].count(req["color"])
                terms.append(1 - abs(count - n) / count)
                if n != count:
                    matched = False
            if "position" in req and matched:
                rel, group = req["position"]
                if groups[group] is None:
                    matched = False
                    terms.append(0.0)
                else:
                    if not _position_ok(found, groups[group], rel, rules.position_threshold):
                        matched = False
                        terms.append(0.0)
                    terms.append(1.0)
        strict &= matched
        groups.append(found if matched else None)
    return strict, (sum(terms) / len(terms) if terms else 0.0)


def judge_detections(raw: Mapping[str, Sequence[Detection]], metadata: Mapping, rules: Rules) -> Verdict:
    """Filter a detector's raw output as GenEval does, then apply both rule sets."""
    detected = keep_detections(raw, metadata.get("tag", ""), rules)
    reasons: list[str] = []
    correct = geneval_correct(detected, metadata, rules, reasons)
    strict, score = flow_grpo_score(detected, metadata, rules)
    return Verdict(correct=correct, strict=strict, score=float(score), reasons=reasons)


def tag_summary(tags: Sequence[str], correct: Sequence[float]) -> dict[str, float]:
    """GenEval's summary table: accuracy per tag and their mean (the overall GenEval score)."""
    by_tag: dict[str, list[float]] = {}
    for t, c in zip(tags, correct):
        by_tag.setdefault(t, []).append(float(c))
    out = {f"tag.{t}": float(np.mean(v)) for t, v in sorted(by_tag.items())}
    out["geneval"] = float(np.mean([out[f"tag.{t}"] for t in by_tag])) if by_tag else float("nan")
    return out
