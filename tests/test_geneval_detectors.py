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
