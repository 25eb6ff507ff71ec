"""The adapter train keeps is the one its rule chooses over all checkpoints, even one evaluated long before."""

import numpy as np
import pandas as pd
import torch
from conftest import TINY
from training_fixtures import tiny_model

from gdro_core.evaluation.monitor import CheckpointMonitor
from gdro_core.models.families import add_lora
from gdro_core.models.lora import lora_state
from gdro_core.params import parse_params
from gdro_core.tasks.ocr.prompts import OcrPrompt
from gdro_core.tasks.ocr.task import OcrTask


def test_a_tie_can_keep_a_checkpoint_from_before_the_last_best(tmp_path, one_thread, monkeypatch):
    p = parse_params(TINY)
    model = tiny_model(p)
    add_lora(model.transformer, p.train.lora)
    val = [OcrPrompt('"123" on a sign', "123")]
    monitor = CheckpointMonitor(model, val, OcrTask(p), judge=None, judge_task="ocr", seed=0, steps=2, guidance=1.0,
                                batch_size=4, keep="best_corrected", workdir=tmp_path / "monitor",
                                log=lambda step, metrics: None, tie_se=1.0)
    rng = np.random.default_rng(0)
    n = 128
    shared = rng.normal(1.0, 0.5, n)
    wide = rng.normal(0, 1.0, n)
    wide = (wide - wide.mean()) / wide.std(ddof=1)  # mean 0, sd 1: the SE of a difference with it is 1 / sqrt(128)
    measured = {  # step: (reward, per-image corrected)
        200: (0.9, shared),
        300: (0.5, shared + 0.05),  # better than 200 on every image: 200 is not tied with it
        400: (0.6, shared + 0.06 + wide),  # best on average, but within one SE (0.088) of both 200 and 300
    }

    def fake_measure(adapter=True):
        reward, corrected = measured[step]
        return {"reward": reward, "corrected": float(corrected.mean())}, pd.DataFrame({"corrected": corrected})

    monkeypatch.setattr(monitor, "_measure", fake_measure)
    names = list(lora_state(model.transformer))
    kept = []
    for step in measured:
        monitor(step, {k: torch.full_like(lora_state(model.transformer)[k], float(step)) for k in names})
        kept.append(monitor.kept_step())
    assert kept == [200, 300, 200]  # 300 beat 200; 400's noise ties all three, and 200 has the highest reward
    step, weights = monitor.kept()
    assert step == 200 and all(torch.all(w == 200.0) for w in weights.values())  # 200's own weights, not 300's
    resumed = CheckpointMonitor(model, val, OcrTask(p), judge=None, judge_task="ocr", seed=0, steps=2, guidance=1.0,
                                batch_size=4, keep="best_corrected", workdir=tmp_path / "monitor",
                                log=lambda step, metrics: None, tie_se=1.0)
    assert resumed.kept_step() == 200  # the per-image scores are on disk: a resumed run chooses the same
