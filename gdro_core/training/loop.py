"""The offline post-training loop: LoRA on the transformer, groups from the reward table, resumable."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import torch

from gdro_core.training.checkpoint import latest_checkpoint, load_checkpoint, restore_rng, rng_state, save_checkpoint
from gdro_core.models.base import FlowModel
from gdro_core.models.lora import add_lora, lora_state, set_lora_state
from gdro_core.objectives.offline import draw_groups, group_objective
from gdro_core.params import Train
from gdro_core.data.rollout import Rollouts

OFFLINE = ("gdro", "dpo", "sft_best")
Logger = Callable[[int, dict[str, float]], None]
OnCheckpoint = Callable[[int, dict[str, torch.Tensor]], None]


def ema_decay(step: int, rate: float, max_decay: float) -> float:
    """The paper's EMA schedule: min(rate · step, max_decay)."""
    return min(rate * step, max_decay)


class LoraEma:
    """Exponential moving average of the adapter weights (what is evaluated and saved)."""

    def __init__(self, params: dict[str, torch.Tensor]):
        self.shadow = {k: v.detach().clone() for k, v in params.items()}

    def update(self, params: dict[str, torch.Tensor], decay: float) -> None:
        for k, v in params.items():
            self.shadow[k].lerp_(v.detach(), 1.0 - decay)


def start_training(model: FlowModel, cfg: Train, ckpt_dir: Path):
    """Fresh adapter, optimiser, RNGs and EMA, restored from the newest checkpoint in ``ckpt_dir`` if any.

    Returns (params, optimiser, generator, python rng, ema, last finished step).
    """
    params = add_lora(model.transformer, cfg.lora)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gen, py_rng = torch.Generator().manual_seed(cfg.seed), random.Random(cfg.seed)
    ema = LoraEma(lora_state(model.transformer))
    start = 0
    last = latest_checkpoint(ckpt_dir)
    if last is not None:
        weights, state = load_checkpoint(last)
        set_lora_state(model.transformer, {k.removeprefix("lora."): v for k, v in weights.items() if k.startswith("lora.")})
        ema.shadow = {k.removeprefix("ema."): v.clone() for k, v in weights.items() if k.startswith("ema.")}
        opt.load_state_dict(state["optimizer"])
        restore_rng(state["rng"], gen, py_rng)
        start = state["step"]
    return params, opt, gen, py_rng, ema, start


def end_of_step(
    step: int, cfg: Train, model: FlowModel, ema: LoraEma, opt: torch.optim.Optimizer, gen: torch.Generator,
    py_rng: random.Random, ckpt_dir: Path, on_checkpoint: OnCheckpoint | None, eval_every: int,
) -> None:
    """Evaluate (every ``eval_every`` steps and at the last) and checkpoint the whole training state."""
    last_step = step == cfg.steps
    if on_checkpoint is not None and eval_every and (step % eval_every == 0 or last_step):
        on_checkpoint(step, ema.shadow)  # before saving: a crash here re-runs the evaluation on resume
        save_now = True
    else:
        save_now = step % cfg.checkpoint_every == 0 or last_step
    if save_now:
        weights = {f"lora.{k}": v for k, v in lora_state(model.transformer).items()}
        weights |= {f"ema.{k}": v for k, v in ema.shadow.items()}
        save_checkpoint(ckpt_dir, step, weights, {"optimizer": opt.state_dict(), "rng": rng_state(gen, py_rng)})


def train(
    model: FlowModel,
    data: Rollouts,
    rewards: torch.Tensor,
    cfg: Train,
    ckpt_dir: Path,
    log: Logger,
    on_checkpoint: OnCheckpoint | None = None,
    eval_every: int = 0,
) -> dict[str, torch.Tensor]:
    """Run ``cfg.steps`` optimiser steps (resuming from ``ckpt_dir``); return the EMA adapter weights.

    ``on_checkpoint(step, ema_weights)`` runs every ``eval_every`` steps and at the last step.
    """
    if cfg.objective not in OFFLINE:
        raise ValueError(f"train.objective {cfg.objective!r} is online: use gdro_core.training.online_grpo.train_online")
    if rewards.shape != data.latents.shape[:2]:
        raise ValueError(f"rewards {tuple(rewards.shape)} do not match rollouts {tuple(data.latents.shape[:2])}")
    params, opt, gen, py_rng, ema, start = start_training(model, cfg, ckpt_dir)
    model.transformer.train()
    for step in range(start + 1, cfg.steps + 1):
        prompts, members = draw_groups(rewards, cfg.groups_per_step, cfg.group_size, cfg.member_sampling, gen)
        x0 = data.latents[prompts.unsqueeze(1), members]
        cond = {k: v[prompts] for k, v in data.cond.items()}
        loss, parts = group_objective(model, x0, cond, rewards[prompts.unsqueeze(1), members], cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        opt.step()
        ema.update(lora_state(model.transformer), ema_decay(step, cfg.ema_rate, cfg.ema_max_decay))
        if step % cfg.log_every == 0 or step == cfg.steps:
            log(step, {f"train/{k}": v for k, v in parts.items()})
        end_of_step(step, cfg, model, ema, opt, gen, py_rng, ckpt_dir, on_checkpoint, eval_every)
    model.transformer.eval()
    set_lora_state(model.transformer, ema.shadow)
    return ema.shadow
