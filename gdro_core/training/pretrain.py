"""Rectified-flow pretraining of the built-in model on the images its task's world draws (``pretrain_batch``)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler

from gdro_core.models.base import velocity
from gdro_core.models.builtin import BuiltinModelAdapter, TextRenderPipeline
from gdro_core.objectives.implicit_reward import interpolate
from gdro_core.objectives.timesteps import sample_timesteps
from gdro_core.params import Pretrain
from gdro_core.training.checkpoint import latest_checkpoint, load_checkpoint, restore_rng, rng_state, save_checkpoint

Logger = Callable[[int, dict[str, float]], None]

WorldBatch = Callable[[int, Pretrain, random.Random], tuple[np.ndarray, list[str]]]
"""n world images (float32, (n, C, H, W) in [-1, 1]) and their captions: a task's ``pretrain_batch``."""


def pretrain(
    pipe: TextRenderPipeline, image_size: tuple[int, int], batch: WorldBatch, cfg: Pretrain, ckpt_dir: Path,
    log: Logger,
) -> int:
    """Train transformer and text encoder jointly on ``batch``'s images of ``image_size`` (height, width);
    resume from the newest checkpoint in ``ckpt_dir``. ``batch`` draws the world's images (a task's
    ``pretrain_batch``)."""
    model = BuiltinModelAdapter(pipe, image_size)
    modules = torch.nn.ModuleDict({"transformer": pipe.transformer, "text_encoder": pipe.text_encoder})
    modules.train().requires_grad_(True)
    opt = torch.optim.AdamW(modules.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = get_scheduler(cfg.lr_schedule, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    gen, py_rng = torch.Generator().manual_seed(cfg.seed), random.Random(cfg.seed)
    start = 0
    last = latest_checkpoint(ckpt_dir)
    if last is not None:
        weights, state = load_checkpoint(last)
        modules.load_state_dict(weights)
        opt.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        restore_rng(state["rng"], gen, py_rng)
        start = state["step"]
    for step in range(start + 1, cfg.steps + 1):
        images, captions = batch(cfg.batch_size, cfg, py_rng)
        x0 = torch.from_numpy(images)
        noise = torch.randn(x0.shape, generator=gen)
        t = sample_timesteps(len(captions), cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std, gen)
        x_t, v = interpolate(x0, noise, t)
        loss = F.mse_loss(velocity(model, x_t, t, model.encode(captions)).float(), v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step % cfg.log_every == 0 or step == cfg.steps:
            log(step, {"pretrain/loss": loss.item(), "pretrain/lr": schedule.get_last_lr()[0]})
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            extra = {"optimizer": opt.state_dict(), "schedule": schedule.state_dict(), "rng": rng_state(gen, py_rng)}
            save_checkpoint(ckpt_dir, step, modules.state_dict(), extra)
    modules.eval().requires_grad_(False)
    return cfg.steps
