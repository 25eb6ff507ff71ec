"""The Mask2Former + CLIP detector's code path on tiny random-weight checkpoints saved to local paths (the rules are
tested on hand-made detections in test_geneval_rules.py), and the clear error when weights are absent."""

import random

import pytest
import torch
from PIL import Image
from tiny_clip import save_tiny_clip

from gdro_core.params import parse_params
from gdro_core.tasks.geneval.detectors import DetectorError, Mask2FormerClipDetector, make_detector
from gdro_core.tasks.geneval.prompts import all_prompts
from gdro_core.tasks.registry import make_task

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = {0: "square", 1: "circle", 2: "cross"}
COLORS = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    root = tmp_path_factory.mktemp("detector-weights")
    torch.manual_seed(0)
    swin = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                      window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32,
                            encoder_feedforward_dim=32, dim_feedforward=32, encoder_layers=1, decoder_layers=2,
                            num_attention_heads=2, num_queries=4, num_labels=len(LABELS), id2label=LABELS,
                            label2id={v: k for k, v in LABELS.items()})
    Mask2FormerForUniversalSegmentation(cfg).save_pretrained(root / "m2f")
    Mask2FormerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(root / "m2f")
    save_tiny_clip(root / "clip")
    return root


def test_mask2former_clip_detector_runs_from_local_paths(checkpoints):
    det = Mask2FormerClipDetector.from_paths(str(checkpoints / "m2f"), str(checkpoints / "clip"), COLORS, 2, "cpu")
    images = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (40, 24), (30, 30, 200)),
              Image.new("RGB", (32, 32), (30, 200, 30))]
    out = det.detect(images)
    assert len(out) == 3
    for im, dets in zip(images, out):
        assert set(dets) <= set(LABELS.values())
        for d in (d for ds in dets.values() for d in ds):
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 <= x1 < im.width and 0 <= y0 <= y1 < im.height
            assert 0.0 <= d.confidence <= 1.0 and d.color in COLORS
    assert any(out), "random weights still give some instance"


def test_geneval_task_scores_through_the_mask2former_detector(checkpoints):
    p = parse_params({"task": "geneval", "geneval": {"classes": ["square", "circle", "cross"], "colors": COLORS,
                                                     "detector": {"kind": "mask2former", "device": "cpu",
                                                                  "mask2former_path": str(checkpoints / "m2f"),
                                                                  "clip_path": str(checkpoints / "clip"),
                                                                  "clip_colors": COLORS, "threshold": 0.0}}})
    task = make_task(p)
    rec = all_prompts("colors", ["circle"], ["red"], 2)[0]
    table = task.reward([task.render(rec, random.Random(0))], [rec])
    assert len(table) == 1 and 0.0 <= table["score"][0] <= 1.0 and table["tag"][0] == "colors"


def test_missing_weights_name_the_key_and_the_fix(tmp_path):
    p = parse_params({"task": "geneval", "geneval": {"detector": {"kind": "mask2former", "clip_path": str(tmp_path)}}})
    with pytest.raises(DetectorError, match="geneval.detector.mask2former_path .*local checkpoint"):
        make_detector(p.geneval)


def test_coco_labels_take_genevals_object_names():
    from gdro_core.tasks.geneval.detectors import geneval_name

    assert [geneval_name(x) for x in ("mouse", "remote", "keyboard", "dog", "cell phone")] == [
        "computer mouse", "tv remote", "computer keyboard", "dog", "cell phone"]


def test_clip_colours_only_the_objects_a_prompt_checks_with_the_same_verdicts(checkpoints, monkeypatch):
    from gdro_core.tasks.geneval.reward import make_rules, reward_table
    from gdro_core.tasks.geneval.rules import judge_detections

    p = parse_params({"task": "geneval", "geneval": {"classes": ["square", "circle", "cross"], "colors": COLORS,
                                                     "detector": {"kind": "mask2former", "device": "cpu",
                                                                  "threshold": 0.0, "counting_threshold": 0.0}}})
    det = Mask2FormerClipDetector.from_paths(str(checkpoints / "m2f"), str(checkpoints / "clip"), COLORS, 2, "cpu")
    crops = []
    classify = det.classify_colors
    monkeypatch.setattr(det, "classify_colors", lambda im, masks, *a: crops.append(len(masks)) or classify(im, masks, *a))
    records = [*all_prompts("colors", ["circle", "square", "cross"], COLORS, 2)[:3],
               *all_prompts("counting", ["circle", "square", "cross"], COLORS, 2)[:3]]
    images = [Image.new("RGB", (32, 32), (40 * i, 200 - 30 * i, 90)) for i in range(len(records))]
    rules = make_rules(p.geneval)

    crops.clear()
    everything = det.detect(images)
    all_crops = sum(crops)
    expected = [judge_detections(d, r.metadata, rules) for d, r in zip(everything, records)]
    crops.clear()
    table = reward_table(images, records, det, rules, 2, "score")
    assert table["score"].tolist() == [v.score for v in expected]
    assert table["correct"].tolist() == [float(v.correct) for v in expected]
    assert all_crops > sum(crops), "colour was classified for objects no clause checks"
    n_coloured_classes = sum(len(d.get(r.metadata["include"][0]["class"], [])[: rules.max_objects])
                             for d, r in zip(everything[:3], records[:3]))
    assert sum(crops) <= n_coloured_classes  # counting prompts check no colour: none of their objects is cropped


def test_every_stage_runs_geneval_on_a_real_architecture_with_mask2former_and_clip(checkpoints, tmp_path, monkeypatch,
                                                                                  prefect_server):
    """GenEval as users run it: a (tiny) SD3 checkpoint, Flow-GRPO's metadata files as published (repeated lines),
    transformers' Mask2Former and CLIP from local directories, through every stage."""
    import json

    import yaml

    from conftest import TINY
    from flows.pipeline import pipeline_flow
    from gdro_core.models.tiny import save_tiny_pipeline

    meta = tmp_path / "metadata"
    meta.mkdir()
    train = [*all_prompts("colors", ["circle", "square", "cross"], COLORS, 2),
             *all_prompts("counting", ["circle", "square"], COLORS, 2)][:7]
    test = all_prompts("two_object", ["circle", "square", "cross"], COLORS, 2)[:3]
    for name, records, repeats in (("train", train, 1), ("test", test, 4)):  # Flow-GRPO's test file: 4 lines each
        lines = [json.dumps({**r.metadata, "prompt": r.prompt}) for r in records for _ in range(repeats)]
        (meta / f"{name}_metadata.jsonl").write_text("\n".join(lines) + "\n")
    project = tmp_path / "project"
    project.mkdir()
    params = {**TINY, "task": "geneval", "model": {"source": str(save_tiny_pipeline("sd3", tmp_path / "sd3")),
                                                     "device": "cpu"},
              "prompts": {"n_val": 2},
              "geneval": {"metadata_dir": str(meta), "world": {"height": 32, "width": 48},
                          "detector": {"kind": "mask2former", "device": "cpu", "batch_size": 4,
                                       "mask2former_path": str(checkpoints / "m2f"),
                                       "clip_path": str(checkpoints / "clip"), "clip_colors": COLORS}}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("GDRO_ROOT", str(project))
    pipeline_flow(params_path="params.yaml")

    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert "ceiling" not in metrics  # no built-in world behind a real checkpoint
    for model in ("base", "trained"):
        assert {"geneval", "tag.two_object", "correct", "score", "corrected"} <= set(metrics[model]), metrics[model]
    scores = __import__("pandas").read_csv(project / "reports" / "eval_scores.csv")
    assert len(scores) == 2 * 3 * parse_params(params).evaluate.images_per_prompt  # repeats folded: 3 test prompts
