"""The offline post-training loop: LoRA on the transformer, groups from the reward table, resumable, data-parallel.

One optimiser step takes a *global batch* of ``groups_per_step`` groups drawn by a generator seeded from
``train.seed`` (the same on every process). Process r of P trains on its contiguous slice, split again into
``gradient_accumulation_steps`` micro-batches; losses are means over groups, DDP averages the gradients over
processes, and each micro-batch's loss is divided by their count: the gradient equals the one-process
gradient of the whole batch, so a run on P processes follows the same loss curve.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator

from gdro_core.build_lock import building
from gdro_core.data.pool import RolloutPool
from gdro_core.data.rollout import Rollouts
from gdro_core.models.base import FlowModel
from gdro_core.models.families import add_lora
from gdro_core.models.lora import init_lora_from, lora_state, set_lora_state
from gdro_core.objectives.offline import OFFLINE_OBJECTIVES, draw_members, draw_randomness, group_objective, prior_noise, seed_matrix
from gdro_core.params import Train
from gdro_core.training.checkpoint import load_latest, restore_rng, rng_state, save_checkpoint

OFFLINE = OFFLINE_OBJECTIVES
COUNTS = ("ranking_hits", "ranking_pairs")
"""Parts of the objective that are counts (summed), not means over groups."""
Logger = Callable[[int, dict[str, float]], None]
OnCheckpoint = Callable[[int, dict[str, torch.Tensor]], None]


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed with the current settings."""


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


def seed_lora_init(transformer: torch.nn.Module, seed: int) -> None:
    """Redraw every lora_A as peft does (Kaiming-uniform, a = √5) from a generator seeded by ``seed``.

    peft draws from the global RNG, which sweep threads share and ``train.seed`` never reached; B stays 0,
    so the policy still starts equal to the reference. Drawn on the CPU: the same init on every device.
    """
    gen = torch.Generator().manual_seed(seed)
    with building(), torch.no_grad():  # a model another thread loads meanwhile would make torch.nn.init a no-op
        for name, p in transformer.named_parameters():
            if "lora_A" in name:
                w = torch.empty(p.shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=gen)
                p.copy_(w)


def make_optimizer(params: list[torch.nn.Parameter], cfg: Train) -> torch.optim.Optimizer:
    """``train.optimizer``: torch AdamW, its fused kernel, or bitsandbytes' 8-bit AdamW."""
    if cfg.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError(
                "train.optimizer 'adamw_8bit' needs bitsandbytes, which is not installed: `pip install bitsandbytes` "
                "(CUDA GPUs), or set train.optimizer to 'adamw' or 'adamw_fused'"
            ) from None
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, fused=True if cfg.optimizer == "adamw_fused" else None)


def start_training(model: FlowModel, cfg: Train, ckpt_dir: Path | None, init_adapter: Path | None = None):
    """Fresh adapter, optimiser, RNGs and EMA, restored from the newest intact checkpoint in ``ckpt_dir`` if any.

    ``init_adapter``: a saved adapter the LoRA (and its EMA) starts from instead of B = 0 (a later round trains
    the previous round's adapter further; the reference stays the base). Every restored tensor goes to the
    device of the parameter it belongs to; ``ckpt_dir`` None starts fresh. Returns (params, optimiser,
    generator, python rng, ema, last finished step).
    """
    params = add_lora(model.transformer, cfg.lora)
    seed_lora_init(model.transformer, cfg.seed)
    if init_adapter is not None:
        init_lora_from(model.transformer, init_adapter)
    if cfg.gradient_checkpointing:
        model.transformer.enable_gradient_checkpointing()
    opt = make_optimizer(params, cfg)
    gen, py_rng = torch.Generator().manual_seed(cfg.seed), random.Random(cfg.seed)
    live = lora_state(model.transformer)
    ema = LoraEma(live)
    devices = {f"{prefix}.{k}": v.device for k, v in live.items() for prefix in ("lora", "ema")}
    found = load_latest(ckpt_dir, map_location=devices) if ckpt_dir is not None else None
    start = 0
    if found is not None:
        weights, state = found
        saved = state.get("groups_per_step", cfg.groups_per_step)
        if saved != cfg.groups_per_step:
            raise ResumeError(
                f"the checkpoint in {ckpt_dir} was trained with a global batch of {saved} groups per step "
                f"(on {state.get('num_processes', 1)} processes) but train.groups_per_step is {cfg.groups_per_step}: "
                "resuming on a different process count works only while the global batch is unchanged; set "
                f"train.groups_per_step back to {saved}, or train from scratch in a fresh checkpoint directory"
            )
        set_lora_state(model.transformer, {k.removeprefix("lora."): v for k, v in weights.items() if k.startswith("lora.")})
        ema.shadow = {k.removeprefix("ema."): v.clone() for k, v in weights.items() if k.startswith("ema.")}
        opt.load_state_dict(state["optimizer"])
        restore_rng(state["rng"], gen, py_rng)
        start = state["step"]
    return params, opt, gen, py_rng, ema, start


def end_of_step(
    step: int, cfg: Train, model: FlowModel, ema: LoraEma, opt: torch.optim.Optimizer, gen: torch.Generator,
    py_rng: random.Random, ckpt_dir: Path, on_checkpoint: OnCheckpoint | None, eval_every: int,
    *, main_process: bool = True, num_processes: int = 1, extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> bool:
    """Evaluate (every ``eval_every`` steps and at the last) and checkpoint the whole training state.

    Only the main process does either; returns whether this step did (other processes then wait for it).
    ``extra`` maps a prefix to further weights the checkpoint holds (e.g. DiffusionNFT's sampling policy under
    ``old``); :func:`restore_extra` reads them back.
    """
    last_step = step == cfg.steps
    # decided from the schedule alone, so every process agrees on it (only the main one has ``on_checkpoint``)
    evaluate = eval_every > 0 and (step % eval_every == 0 or last_step)
    save_now = evaluate or step % cfg.checkpoint_every == 0 or last_step
    if not main_process:
        return save_now
    if evaluate and on_checkpoint is not None:
        on_checkpoint(step, ema.shadow)  # before saving: a crash here re-runs the evaluation on resume
    if save_now:
        weights = {f"lora.{k}": v for k, v in lora_state(model.transformer).items()}
        weights |= {f"ema.{k}": v for k, v in ema.shadow.items()}
        for prefix, tensors in (extra or {}).items():
            weights |= {f"{prefix}.{k}": v for k, v in tensors.items()}
        state = {"optimizer": opt.state_dict(), "rng": rng_state(gen, py_rng), "groups_per_step": cfg.groups_per_step,
                 "num_processes": num_processes}
        save_checkpoint(ckpt_dir, step, weights, state)
    return save_now


def restore_extra(ckpt_dir: Path | None, prefix: str, target: dict[str, torch.Tensor]) -> bool:
    """Copy the newest checkpoint's ``prefix.*`` weights (see :func:`end_of_step`) into ``target`` in place.

    Returns False, leaving ``target`` as it is, when there is no checkpoint; a checkpoint without them is an error.
    """
    found = load_latest(ckpt_dir) if ckpt_dir is not None else None
    if found is None:
        return False
    saved = {k.removeprefix(f"{prefix}."): v for k, v in found[0].items() if k.startswith(f"{prefix}.")}
    if set(saved) != set(target):
        raise ResumeError(f"the checkpoint in {ckpt_dir} holds no complete '{prefix}' weights: it was written by "
                          "another objective; train from scratch in a fresh checkpoint directory")
    for k, v in saved.items():
        target[k].copy_(v.to(target[k]))
    return True


def warn_zero_signal(rewards: torch.Tensor) -> int:
    """Warn once how many prompts' pools hold equal rewards only: their groups carry no ranking signal."""
    flat = int((rewards.amax(dim=1) == rewards.amin(dim=1)).sum())
    if flat:
        warnings.warn(
            f"{flat} of {rewards.shape[0]} prompts have the same reward for all {rewards.shape[1]} images: their groups "
            "carry no ranking signal (only the anchor term learns from them); check the reward table",
            stacklevel=2,
        )
    return flat


def make_accelerator(model: FlowModel) -> Accelerator:
    """The process group this run belongs to (one process unless started by torchrun / accelerate launch).

    Devices stay where the model was loaded; gradient accumulation is done by the loop (accelerate's
    accumulation flag lives in process-wide state that parallel sweep threads would share).
    """
    return Accelerator(cpu=model.device.type == "cpu", device_placement=False)


def _reduce(accelerator: Accelerator, sums: dict[str, float], groups: int) -> dict[str, float]:
    """Step metrics over the whole global batch: means over its groups, ranking accuracy over ranked pairs."""
    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, "sum")
    total = dict(zip(keys, values.tolist()))
    out = {k: v / groups for k, v in total.items() if k not in COUNTS}
    if total.get("ranking_pairs", 0) > 0:  # groups with equal rewards hold no ordered pair and are left out
        out["ranking_accuracy"] = total["ranking_hits"] / total["ranking_pairs"]
    return out


def train_step(
    model: FlowModel,
    data: Rollouts | RolloutPool,
    rewards: torch.Tensor,
    cfg: Train,
    step: int,
    params: list[torch.nn.Parameter],
    opt: torch.optim.Optimizer,
    ema: LoraEma,
    gen: torch.Generator,
    accelerator: Accelerator,
    policy: torch.nn.Module | None = None,
    seeds: torch.Tensor | None = None,
) -> tuple[dict[str, float], float]:
    """Optimiser step number ``step`` of :func:`train` (what ``gdro train`` runs, and what the GPU benchmark times).

    Draws ``groups_per_step`` groups and their (order, t, ε) from ``gen``, backpropagates this process's
    share in ``gradient_accumulation_steps`` micro-batches through ``policy`` (``model.transformer`` or its
    DDP wrapper), clips the gradient, steps ``opt`` and updates the EMA. ``seeds`` (P, N) are the images' sampler
    seeds (:func:`seed_matrix`) that ``train.noise: prior`` regenerates ε from. Returns this process's metric
    sums (means weighted by groups; counts summed) and the gradient norm before clipping.
    """
    policy = model.transformer if policy is None else policy
    n_proc, rank, n_acc = accelerator.num_processes, accelerator.process_index, cfg.gradient_accumulation_steps
    micro = cfg.groups_per_step // (n_proc * n_acc)
    if cfg.noise == "prior" and seeds is None:
        raise ValueError("train.noise 'prior' needs the rollout seeds: pass seeds=seed_matrix(data.rows, *rewards.shape)")
    prompts, members = draw_members(rewards, cfg, gen)
    group_rewards = rewards[prompts.unsqueeze(1), members]
    prior = None if cfg.noise != "prior" else prior_noise(seeds[prompts.unsqueeze(1), members], tuple(data.item_shape))
    draws = draw_randomness(group_rewards, tuple(data.item_shape), cfg, gen, member_noise=prior)
    opt.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    for a in range(n_acc):
        lo = (rank * n_acc + a) * micro
        rows = slice(lo, lo + micro)
        x0, cond = data.take(prompts[rows], members[rows])
        with accelerator.no_sync(policy) if a < n_acc - 1 else nullcontext():
            loss, parts = group_objective(model, x0, cond, group_rewards[rows], cfg, draws=draws.rows(rows),
                                          policy=policy)
            accelerator.backward(loss / n_acc)
        for k, v in parts.items():
            if k != "ranking_accuracy":
                sums[k] = sums.get(k, 0.0) + (v if k in COUNTS else v * micro)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
    opt.step()
    ema.update(lora_state(model.transformer), ema_decay(step, cfg.ema_rate, cfg.ema_max_decay))
    return sums, grad_norm


def train(
    model: FlowModel,
    data: Rollouts | RolloutPool,
    rewards: torch.Tensor,
    cfg: Train,
    ckpt_dir: Path,
    log: Logger,
    on_checkpoint: OnCheckpoint | None = None,
    eval_every: int = 0,
    *,
    accelerator: Accelerator | None = None,
    init_adapter: Path | None = None,
) -> dict[str, torch.Tensor]:
    """Run ``cfg.steps`` optimiser steps (resuming from ``ckpt_dir``); return the EMA adapter weights.

    ``data`` is anything with ``shape``, ``item_shape`` and ``take(prompts, members)``: the eager
    :class:`Rollouts` or the lazily read :class:`gdro_core.data.pool.RolloutPool`. ``on_checkpoint(step,
    ema_weights)`` runs every ``eval_every`` steps and at the last step, on the main process only.
    ``init_adapter``: the saved adapter training starts from (see :func:`start_training`).
    """
    if cfg.objective not in OFFLINE:
        raise ValueError(f"train.objective {cfg.objective!r} is online: use gdro_core.training.online_grpo.train_online")
    if tuple(rewards.shape) != tuple(data.shape):
        raise ValueError(f"rewards {tuple(rewards.shape)} do not match rollouts {tuple(data.shape)}")
    acc = accelerator or make_accelerator(model)
    n_proc, rank, n_acc = acc.num_processes, acc.process_index, cfg.gradient_accumulation_steps
    if cfg.groups_per_step % (n_proc * n_acc):
        raise ValueError(
            f"train.groups_per_step ({cfg.groups_per_step}) does not split over {n_proc} processes x "
            f"{n_acc} accumulation steps: make it a multiple of {n_proc * n_acc}"
        )
    if n_proc > 1 and acc.device.type == "cuda" and model.device != acc.device:
        raise ValueError(
            f"process {rank} holds the model on {model.device} but its device is {acc.device}: "
            "set model.device to 'auto' so that each process loads the model onto its own GPU"
        )
    if cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if acc.is_main_process:
        warn_zero_signal(rewards)
    params, opt, gen, py_rng, ema, start = start_training(model, cfg, ckpt_dir, init_adapter)
    policy = acc.prepare(model.transformer) if n_proc > 1 else model.transformer
    seeds = seed_matrix(data.rows, *rewards.shape) if cfg.noise == "prior" else None
    model.transformer.train()
    for step in range(start + 1, cfg.steps + 1):
        sums, grad_norm = train_step(model, data, rewards, cfg, step, params, opt, ema, gen, acc, policy, seeds)
        if step % cfg.log_every == 0 or step == cfg.steps:
            metrics = _reduce(acc, sums, cfg.groups_per_step) | {"grad_norm": grad_norm}
            if acc.is_main_process:
                log(step, {f"train/{k}": v for k, v in metrics.items()})
        saved = end_of_step(step, cfg, model, ema, opt, gen, py_rng, ckpt_dir, on_checkpoint, eval_every,
                            main_process=acc.is_main_process, num_processes=n_proc)
        if saved and n_proc > 1:
            acc.wait_for_everyone()
    model.transformer.eval()
    set_lora_state(model.transformer, ema.shadow)
    return ema.shadow
