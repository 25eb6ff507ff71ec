"""Rectified-flow pretraining of the built-in model on text the world renders itself."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from scipy import ndimage

from gdro_core.training.checkpoint import latest_checkpoint, load_checkpoint, restore_rng, rng_state, save_checkpoint
from gdro_core.models.base import velocity
from gdro_core.models.builtin import BuiltinModelAdapter, TextRenderPipeline
from gdro_core.objectives.implicit_reward import interpolate
from gdro_core.params import Pretrain, World
from gdro_core.data.prompts import random_string
from gdro_core.tasks.text_render import render_batch
from gdro_core.objectives.timesteps import sample_timesteps

Logger = Callable[[int, dict[str, float]], None]


def random_text(world: World, rng: random.Random) -> str:
    return random_string(world.alphabet, world.min_len, world.max_len, rng)


def mislabel(text: str, world: World, rng: random.Random) -> str:
    """Another random string: a mislabelled image, as web captions often are, so the base sometimes ignores its prompt."""
    for _ in range(100):
        other = random_text(world, rng)
        if other != text:
            return other
    return text


def caption_batch(
    world: World, templates: list[str], cfg: Pretrain, n: int, rng: random.Random
) -> tuple[list[str], list[str]]:
    """Random target strings (what is drawn) and their captions (what the model is told)."""
    texts = [random_text(world, rng) for _ in range(n)]
    captions = []
    for t in texts:
        if rng.random() < cfg.cond_dropout:
            captions.append("")
            continue
        shown = mislabel(t, world, rng) if rng.random() < cfg.caption_noise else t
        captions.append(rng.choice(templates).format(text=shown))
    return texts, captions


def degrade(images: np.ndarray, share: float, sigma: float, rng: random.Random) -> np.ndarray:
    """Blur a random ``share`` of the images (in place, every channel): the low-quality part of the training data.

    A base that sometimes draws a blurred image for any prompt has a failure mode that reward
    training can remove everywhere, the way real web-trained models learn to avoid blurry images.
    """
    if share <= 0:
        return images
    background = float(images.min())
    for img in images:
        if rng.random() < share:
            for channel in img:
                channel[:] = ndimage.gaussian_filter(channel, sigma, mode="constant", cval=background)
    return images


WorldBatch = Callable[[int, Pretrain, random.Random], tuple[np.ndarray, list[str]]]
"""n world images (float32, (n, C, H, W) in [-1, 1]) and their captions: a task's ``pretrain_batch``."""


def text_batch(world: World, templates: list[str]) -> WorldBatch:
    """The OCR world's batches: rendered strings, some blurred, under their (sometimes noisy) captions."""

    def batch(n: int, cfg: Pretrain, rng: random.Random) -> tuple[np.ndarray, list[str]]:
        texts, captions = caption_batch(world, templates, cfg, n, rng)
        clean = render_batch(texts, world.height, world.width, world.font_size, world.jitter, rng)
        return degrade(clean, cfg.low_quality_share, cfg.low_quality_blur, rng), captions

    return batch


def pretrain(
    pipe: TextRenderPipeline, world: World, templates: list[str], cfg: Pretrain, ckpt_dir: Path, log: Logger,
    batch: WorldBatch | None = None,
) -> int:
    """Train transformer and text encoder jointly; resume from the newest checkpoint in ``ckpt_dir``.

    ``batch`` draws the world's images (a task's ``pretrain_batch``); by default the OCR world's text.
    """
    batch = batch or text_batch(world, templates)
    model = BuiltinModelAdapter(pipe, (world.height, world.width))
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
        t = sample_timesteps(len(captions), "logit_normal", 0.0, 1.0, gen)
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
