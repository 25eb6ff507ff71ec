"""The task seam: OCR behind it gives exactly what the OCR code gave before; the built-in model takes its channels
from the task; the online baseline's reward goes through the task."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from gdro_core.data.scoring import score_task_rollouts
from gdro_core.models.builtin import BuiltinModelAdapter, build_builtin_pipeline
from gdro_core.params import parse_params
from gdro_core.tasks.geneval.prompts import all_prompts
from gdro_core.tasks.ocr.reward import score_images
from gdro_core.tasks.ocr.task import OcrTask
from gdro_core.tasks.ocr.world import caption_batch, render_batch, render_text
from gdro_core.tasks.registry import make_task
from gdro_core.training.degrade import degrade
from gdro_core.training.online_grpo import task_reward

pytestmark = pytest.mark.usefixtures("one_thread")


class FixedReader:
    """Reads back a fixed string per image, so the OCR reward is checked without an OCR engine."""

    def __init__(self, reads):
        self.reads = list(reads)

    def read(self, images):
        out, self.reads = self.reads[: len(images)], self.reads[len(images) :]
        return out


def test_ocr_task_pretrain_batches_are_the_old_ones():
    p = parse_params({"pretrain": {"caption_noise": 0.2, "low_quality_share": 0.3}})
    w, cfg = p.world, p.pretrain
    old_rng, new_rng = random.Random(3), random.Random(3)
    texts, captions = caption_batch(w, p.prompts.templates, cfg, 16, old_rng)
    old = degrade(render_batch(texts, w.height, w.width, w.font_size, w.jitter, old_rng), cfg.low_quality_share,
                  cfg.low_quality_blur, old_rng)
    new, new_captions = OcrTask(p).pretrain_batch(16, cfg, new_rng)
    assert new_captions == captions and np.array_equal(new, old)
    assert old_rng.random() == new_rng.random()  # the same draws, so the rest of pretraining is the same too


def test_ocr_task_reward_is_score_images():
    p = parse_params({})
    targets = ["123", "456", "789"]
    reads = ["123", "45", "000"]
    images = [render_text(t, 24, 48, 17) for t in targets]
    task = OcrTask(p, reader=FixedReader(reads))
    table = task.reward(images, [task.record(f'"{t}" on a sign', t) for t in targets])
    expected = score_images(images, targets, FixedReader(reads), False, p.reward.batch_size)
    assert table.equals(expected) and table["reward"].tolist() == pytest.approx([1.0, 2 / 3, 0.0])
    assert make_task(p).name == "ocr" and p.image_shape == (p.world.height, p.world.width, 1)


def test_score_task_rollouts_rebuilds_records_from_rows(tmp_path):
    task = make_task(parse_params({"task": "geneval"}))
    rec = all_prompts("counting", ["circle"], ["red"], 2)[0]
    task.render(rec, random.Random(0)).save(tmp_path / "a.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "b.png")
    rows = [{"prompt_index": 0, "member": m, "prompt": rec.prompt, "target": rec.target, "image": f"{n}.png"}
            for m, n in enumerate("ab")]
    table = score_task_rollouts(rows, tmp_path, task)
    assert table["member"].tolist() == [0, 1] and table["correct"].tolist() == [1.0, 0.0]


def test_online_reward_goes_through_the_task():
    task = make_task(parse_params({"task": "geneval"}))
    recs = all_prompts("colors", ["square"], ["red", "blue"], 2)
    images = [task.render(r, random.Random(i)) for i, r in enumerate(recs)]
    reward = task_reward(task, recs)
    assert reward(images, [recs[0].target, recs[0].target]).tolist() == [1.0, 0.5]


def test_builtin_model_takes_the_tasks_channels():
    p = parse_params({"task": "geneval", "model": {"builtin": {"layers": 1, "heads": 2, "head_dim": 8,
                                                               "text_dim": 16, "text_layers": 1}}})
    pipe = build_builtin_pipeline(p.model.builtin, p.image_shape, 1.0, 0)
    model = BuiltinModelAdapter(pipe, make_task(p).world_shape)
    assert model.latent_shape == (3, 32, 32)
    (im,) = model.decode(torch.zeros(1, 3, 32, 32))
    assert im.mode == "RGB" and im.size == (32, 32)


def test_the_second_reader_is_the_backend_training_did_not_use(monkeypatch):
    import gdro_core.tasks.ocr.reader as reader_module

    made = []

    def fake_reader(backend, *args, **kwargs):
        made.append(backend)
        return FixedReader(["12", "000"])

    monkeypatch.setattr(reader_module, "make_reader", fake_reader)
    images = [render_text(t, 24, 48, 17) for t in ("123", "456")]
    for backend, choice, expected in (("easyocr", "auto", "rapidocr"), ("rapidocr", "auto", "easyocr"),
                                      ("easyocr", "easyocr", ""), ("easyocr", "none", "")):
        made.clear()
        task = OcrTask(parse_params({"reward": {"backend": backend}, "evaluate": {"second_reader": choice}}))
        records = [task.record('"123" on a sign', "123"), task.record('"456" on a sign', "456")]
        opinion = task.second_opinion(images, records)
        assert made == ([expected] if expected else [])
        if expected:
            assert opinion == {"second_reward": pytest.approx((2 / 3 + 0) / 2), "second_exact": 0.0}
        else:
            assert opinion == {}
