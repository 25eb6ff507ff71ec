"""A judge answer without its score lines is recorded as missing and counted; training goes on to the end."""

import math

import pytest

from conftest import TINY
from gdro_core.evaluation.curves import best_step
from gdro_core.evaluation.monitor import CheckpointMonitor
from gdro_core.evaluation.vlm_judge import UnifiedRewardJudge
from gdro_core.params import parse_params
from gdro_core.tasks.ocr.task import OcrTask
from gdro_core.tasks.ocr.prompts import OcrPrompt
from gdro_core.training.loop import train
from training_fixtures import tiny_data, tiny_model


class ReadsNothing:
    """An OCR reader that reads no text (the reward is then 0 for every image)."""

    def read(self, images):
        return [""] * len(images)


class Rambling(UnifiedRewardJudge):
    """A VLM judge that never answers in the score format (as a wrongly prompted or tiny model does)."""

    def __init__(self, answers):
        super().__init__(None, None, 8)
        self.answers = answers

    def answer(self, image, prompt):
        return next(self.answers)


def test_a_judge_that_never_answers_in_format_does_not_abort_training(tmp_path, one_thread, caplog):
    p = parse_params({**TINY, "evaluate": {**TINY["evaluate"], "checkpoint_every": 2}})
    model = tiny_model(p)
    data, rewards = tiny_data(p)
    val = [OcrPrompt('"123" on a sign', "123"), OcrPrompt('"456" on a sign', "456")]
    judge = Rambling(iter(["I would rather not say."] * 100))
    seen = []
    monitor = CheckpointMonitor(
        model, val, OcrTask(p, reader=ReadsNothing()), judge, judge_task="ocr", seed=0, steps=p.sampler.steps,
        guidance=1.0, batch_size=4, keep="best_corrected", workdir=tmp_path / "monitor",
        log=lambda step, metrics: seen.append((step, metrics)),
    )
    monitor.evaluate_base()
    train(model, data, rewards, p.train, tmp_path / "ckpt", lambda *a: None, on_checkpoint=monitor, eval_every=2)

    assert list(monitor.curve["step"]) == [0, 2, 4]  # every checkpoint evaluated, training ran to its last step
    assert list(monitor.curve["judge_missing"]) == [2.0, 2.0, 2.0]  # counted per checkpoint ...
    assert [m["checkpoint/judge_missing"] for _, m in seen] == [2.0, 2.0, 2.0]  # ... and logged
    assert monitor.curve["corrected"].isna().all()
    step, weights = monitor.kept()  # no corrected score anywhere: the last checkpoint is kept
    assert step == 4 and weights
    assert "recorded as missing" in caplog.text


def test_checkpoints_without_a_corrected_score_are_passed_over():
    import pandas as pd

    curve = pd.DataFrame({"step": [0, 2, 4, 6], "reward": [0.1, 0.2, 0.3, 0.4],
                          "corrected": [0.1, 0.5, math.nan, 0.3]})
    assert best_step(curve, "best_corrected") == 2
    curve["corrected"] = [0.1, math.nan, math.nan, math.nan]
    assert best_step(curve, "best_corrected") == 6
    with pytest.raises(ValueError, match="no trained checkpoint"):
        best_step(curve[curve["step"] == 0], "best_corrected")


def test_checkpoints_judge_every_image_of_each_validation_prompt(tmp_path, one_thread):
    """evaluate.checkpoint_images_per_prompt: each validation prompt is drawn that many times (seeds differ)."""
    p = parse_params(TINY)
    val = [OcrPrompt('"123" on a sign', "123"), OcrPrompt('"456" on a sign', "456")]
    judge = Rambling(iter(["no scores here"] * 100))
    monitor = CheckpointMonitor(
        tiny_model(p), val, OcrTask(p, reader=ReadsNothing()), judge, judge_task="ocr", seed=0,
        steps=p.sampler.steps, guidance=1.0, batch_size=4, keep="best_corrected", workdir=tmp_path / "monitor",
        log=lambda step, metrics: None, per_prompt=3,
    )
    monitor.evaluate_base()
    assert list(monitor.curve["judge_missing"]) == [6.0]  # 2 prompts x 3 images, each judged
