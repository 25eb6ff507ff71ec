"""GenEval's rules on hand-made detections: every tag, exclude on counting, the position threshold, NMS, and
Flow-GRPO's strict correctness and partial credit."""

import pytest

from gdro_core.tasks.geneval.rules import (
    Detection,
    Rules,
    flow_grpo_score,
    iou,
    judge_detections,
    keep_detections,
    relative_position,
    tag_summary,
)

RULES = Rules()


def box(cx, cy, size=10):
    return (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)


def det(cx, cy, color=None, conf=0.99, size=10):
    return Detection(box(cx, cy, size), conf, color)


def test_single_object_needs_the_class():
    meta = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "exclude": []}
    assert judge_detections({"dog": [det(50, 50)]}, meta, RULES).correct
    v = judge_detections({"cat": [det(50, 50)]}, meta, RULES)
    assert not v.correct and not v.strict and v.score == 0.0


def test_two_objects_need_both():
    meta = {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]}
    assert judge_detections({"dog": [det(20, 50)], "cat": [det(80, 50)]}, meta, RULES).correct
    v = judge_detections({"dog": [det(20, 50)]}, meta, RULES)
    assert not v.correct and v.score == pytest.approx(0.5)


def test_counting_exclude_rejects_one_too_many():
    meta = {"tag": "counting", "include": [{"class": "cup", "count": 3}], "exclude": [{"class": "cup", "count": 4}]}
    three = [det(10 + 20 * i, 50) for i in range(3)]
    assert judge_detections({"cup": three}, meta, RULES).correct
    four = three + [det(90, 50)]
    v = judge_detections({"cup": four}, meta, RULES)
    assert not v.correct  # the exclude clause
    assert not v.strict and v.score == pytest.approx(1 - 1 / 3)  # Flow-GRPO: exact count, partial credit
    # without the exclude clause GenEval accepts four cups as "at least three"
    assert judge_detections({"cup": four}, {**meta, "exclude": []}, RULES).correct
    v2 = judge_detections({"cup": three[:2]}, meta, RULES)
    assert not v2.correct and v2.score == pytest.approx(2 / 3)


def test_counting_uses_the_counting_threshold():
    meta = {"tag": "counting", "include": [{"class": "cup", "count": 2}], "exclude": [{"class": "cup", "count": 3}]}
    dets = [det(20, 50, conf=0.95), det(50, 50, conf=0.95), det(80, 50, conf=0.5)]
    assert judge_detections({"cup": dets}, meta, RULES).correct  # the 0.5 box is below 0.9: two cups
    assert not judge_detections({"cup": dets}, {**meta, "tag": "two_object"}, RULES).correct  # 0.3: three


def test_colors_checks_the_colour_of_the_object():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    assert judge_detections({"car": [det(50, 50, "red")]}, meta, RULES).correct
    v = judge_detections({"car": [det(50, 50, "blue")]}, meta, RULES)
    assert not v.correct and not v.strict and v.score == pytest.approx(0.5)


def test_color_attr_binds_each_colour_to_its_class():
    meta = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                             {"class": "bus", "count": 1, "color": "green"}]}
    assert judge_detections({"car": [det(20, 50, "red")], "bus": [det(80, 50, "green")]}, meta, RULES).correct
    swapped = judge_detections({"car": [det(20, 50, "green")], "bus": [det(80, 50, "red")]}, meta, RULES)
    assert not swapped.correct and swapped.score == pytest.approx(0.5)


def test_position_relative_to_the_first_group():
    meta = {"tag": "position", "include": [{"class": "bus", "count": 1},
                                           {"class": "car", "count": 1, "position": ["left of", 0]}]}
    assert judge_detections({"bus": [det(80, 50)], "car": [det(20, 50)]}, meta, RULES).correct
    wrong = judge_detections({"bus": [det(20, 50)], "car": [det(80, 50)]}, meta, RULES)
    assert not wrong.correct and not wrong.strict
    # Flow-GRPO's reference appends 0 then 1 for a failed position check: (1 + 1 + 0 + 1) / 4
    assert wrong.score == pytest.approx(0.75)
    missing_target = judge_detections({"car": [det(20, 50)]}, meta, RULES)
    assert not missing_target.correct and any("no target" in r for r in missing_target.reasons)


def test_position_threshold_ignores_small_offsets():
    a, b = det(50, 50), det(55, 50)  # 5 px apart, boxes 10 px: 5 - 0.1 * 20 = 3 px, 3 / 5 > 0.5
    assert relative_position(a, b, 0.1) == {"left of"}
    assert relative_position(a, b, 0.2) == set()  # 5 - 4 = 1 px, 1 / 5 < 0.5: not clearly left
    assert relative_position(a, b, 0.3) == set()  # 5 - 6 < 0: too close to call
    # mostly below, a little right: only "below" (dx / |offset| <= 0.5)
    assert relative_position(det(52, 80), det(50, 50), 0.1) == {"below"}
    assert relative_position(det(80, 20), det(50, 50), 0.1) == {"right of", "above"}
    meta = {"tag": "position", "include": [{"class": "bus", "count": 1},
                                           {"class": "car", "count": 1, "position": ["left of", 0]}]}
    near = {"bus": [det(55, 50)], "car": [det(50, 50)]}
    assert judge_detections(near, meta, RULES).correct
    assert not judge_detections(near, meta, Rules(position_threshold=0.2)).correct


def test_threshold_max_objects_and_nms():
    dets = [det(50, 50, conf=0.9), det(51, 50, conf=0.8), det(90, 90, conf=0.2)]
    assert len(keep_detections({"dog": dets}, "single_object", RULES)["dog"]) == 2  # 0.2 is below 0.3
    assert len(keep_detections({"dog": dets}, "single_object", Rules(nms_threshold=0.5))["dog"]) == 1
    assert len(keep_detections({"dog": dets}, "single_object", Rules(max_objects=1))["dog"]) == 1
    assert keep_detections({"dog": [det(1, 1, conf=0.1)]}, "single_object", RULES) == {}
    assert iou(box(50, 50), box(50, 50)) == pytest.approx(1.0) and iou(box(0, 0), box(100, 100)) == 0.0


def test_colour_checks_only_the_most_confident_objects():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    dets = {"car": [det(20, 50, "blue", conf=0.9), det(80, 50, "red", conf=0.8)]}
    assert not judge_detections(dets, meta, RULES).correct  # GenEval checks the top-1 car, which is blue


def test_flow_grpo_score_is_one_for_a_perfect_image():
    meta = {"include": [{"class": "car", "count": 2, "color": "red"}]}
    strict, score = flow_grpo_score({"car": [det(20, 50, "red"), det(80, 50, "red")]}, meta, RULES)
    assert strict and score == 1.0


def test_flow_grpo_score_goes_below_zero_for_far_too_many_objects():
    """The reference does not clip 1 - |count - found| / count: three dogs for "a photo of a dog" score -1."""
    meta = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "exclude": []}
    v = judge_detections({"dog": [det(10, 10), det(50, 50), det(90, 90)]}, meta, RULES)
    assert v.correct and not v.strict and v.score == pytest.approx(-1.0)


def test_tag_summary_is_the_mean_of_tag_means():
    s = tag_summary(["counting", "counting", "colors"], [1, 0, 1])
    assert s["tag.counting"] == 0.5 and s["tag.colors"] == 1.0 and s["geneval"] == pytest.approx(0.75)
