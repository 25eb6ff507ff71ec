"""The online Flow-GRPO baseline loop (Liu et al. 2025, arXiv 2505.05470), resumable like the offline loop.

Each iteration draws ``grpo_prompts_per_iteration`` training prompts, samples ``grpo_group_size`` fresh images
per prompt with the SDE sampler of :func:`gdro_core.flow_grpo.sde_step` (recording every step's state and
log π_old), scores them with the task reward, normalises the rewards within each group and then, for
``grpo_inner_epochs`` passes over those samples in ``grpo_minibatches`` minibatches, minimises the
clipped-ratio loss plus β_KL · KL to the reference (the adapter switched off) on the first
⌊grpo_sample_steps · grpo_timestep_fraction⌋ denoising steps. Everything but the data and the loss is
shared with :mod:`gdro_core.training`: the LoRA, the optimiser, the EMA, checkpoints and the checkpoint
callback. ``train.steps`` counts iterations.

The same loop runs the forward-process online objectives ``diffusion_nft`` and ``awm``
(:mod:`gdro_core.training.online_matching`): same prompts, groups, advantages and schedule, an ODE sampler
and their own losses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from gdro_core.objectives.flow_grpo import gaussian_kl, group_advantages, grpo_loss, sde_step, step_log_prob
from gdro_core.models.base import Condition, FlowModel
from gdro_core.models.base import guided_velocity as family_guided_velocity
from gdro_core.models.lora import lora_state, reference, set_lora_state
from gdro_core.params import Train
from gdro_core.tasks.base import PromptRecord, Task
from gdro_core.training.loop import Logger, LoraEma, OnCheckpoint, ema_decay, end_of_step, restore_extra, start_training
from gdro_core.training.online_matching import ADV_EPS, MATCHING_OBJECTIVES, sample_clean, update_matching

RewardFn = Callable[[list[Image.Image], list[str]], Sequence[float] | Tensor]
"""Task reward of each image against its target text."""


@dataclass(frozen=True)
class Trajectories:
    """SDE rollouts: ``states[j]`` = x_j, ``next_states[j]`` = x_{j+1}, ``log_probs[j]`` = log π_old(x_{j+1} | x_j)."""

    states: Tensor  # (S, B, C, H, W)
    next_states: Tensor  # (S, B, C, H, W)
    log_probs: Tensor  # (S, B)

    @property
    def final(self) -> Tensor:
        """The clean latents x_S the reward sees."""
        return self.next_states[-1]


def sigma_schedule(model: FlowModel, steps: int) -> Tensor:
    """σ_0 = 1 > … > σ_steps = 0: the family's sampling schedule (with its shift), as the ODE sampler uses."""
    return model.sampling_scheduler(steps).sigmas.float().cpu()


def train_timesteps(steps: int, fraction: float) -> int:
    """⌊steps · fraction⌋ (the reference's num_train_timesteps), at least one."""
    return max(1, int(steps * fraction))


def guided_velocity(
    model: FlowModel, x: Tensor, sigma: Tensor, cond: Condition, null: Condition, guidance: float
) -> Tensor:
    """The family's guided velocity (classifier-free v_u + w (v_c − v_u) for w > 1, or embedded guidance); float32."""
    return family_guided_velocity(model, x, sigma.to(model.device, torch.float32).expand(x.shape[0]), cond, null,
                                  guidance)


@torch.no_grad()
def sample_trajectories(
    model: FlowModel, cond: Condition, null: Condition, sigmas: Tensor, eta: float, guidance: float,
    gen: torch.Generator,
) -> Trajectories:
    """One SDE trajectory per conditioning row, from x_0 ~ N(0, I) (noise drawn from ``gen``)."""
    n = cond["pooled_projections"].shape[0]
    x = torch.randn((n, *model.latent_shape), generator=gen).to(model.device)
    states, nexts, log_probs = [], [], []
    for i in range(len(sigmas) - 1):
        v = guided_velocity(model, x, sigmas[i], cond, null, guidance)
        noise = torch.randn(x.shape, generator=gen).to(model.device)
        x_next, mean, std = sde_step(x, v, sigmas[i], sigmas[i + 1], eta, noise=noise, sigma_max=sigmas[1])
        states.append(x)
        nexts.append(x_next)
        log_probs.append(step_log_prob(x_next, mean, std))
        x = x_next
    return Trajectories(torch.stack(states), torch.stack(nexts), torch.stack(log_probs))


def step_loss(
    model: FlowModel, traj: Trajectories, j: int, idx: Tensor, cond: Condition, null: Condition,
    advantages: Tensor, sigmas: Tensor, cfg: Train, guidance: float,
) -> tuple[Tensor, dict[str, float]]:
    """Flow-GRPO loss at denoising step j on samples ``idx``: :func:`grpo_loss` of the replayed step.

    log π_θ(x_{j+1} | x_j) from the policy's mean, the ratio against the recorded log π_old, plus
    β_KL · ‖μ_θ − μ_ref‖² / (2 σ_t²) (the reference code's KL scale: the closed form times |Δt|).
    Returns the loss and its parts: the KL, the share of clipped ratios and the mean |log ρ|.
    """
    x = traj.states[j, idx]
    c = {k: v[idx] for k, v in cond.items()}
    zeros = torch.zeros_like(x)
    v = guided_velocity(model, x, sigmas[j], c, null, guidance)
    _, mean, std = sde_step(x, v, sigmas[j], sigmas[j + 1], cfg.grpo_eta, noise=zeros, sigma_max=sigmas[1])
    log_prob = step_log_prob(traj.next_states[j, idx], mean, std)
    old = traj.log_probs[j, idx]
    kl = None
    if cfg.grpo_kl_beta > 0:
        with torch.no_grad(), reference(model.transformer):
            v_ref = guided_velocity(model, x, sigmas[j], c, null, guidance)
        _, ref_mean, _ = sde_step(x, v_ref, sigmas[j], sigmas[j + 1], cfg.grpo_eta, noise=zeros, sigma_max=sigmas[1])
        kl = gaussian_kl(mean, ref_mean, std / math.sqrt(float(sigmas[j] - sigmas[j + 1])))
    loss = grpo_loss(log_prob, old, advantages[idx], cfg.grpo_clip_range, kl, cfg.grpo_kl_beta, cfg.grpo_adv_clip_max)
    log_ratio = (log_prob - old).detach()
    parts = {
        "kl": float(kl.detach().mean()) if kl is not None else 0.0,
        "clip_fraction": float((log_ratio.exp().sub(1).abs() > cfg.grpo_clip_range).float().mean()),
        "abs_log_ratio": float(log_ratio.abs().mean()),
    }
    return loss, parts


def update_policy(
    model: FlowModel, traj: Trajectories, cond: Condition, null: Condition, rewards: Tensor, sigmas: Tensor,
    cfg: Train, guidance: float, step: int, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer,
    ema: LoraEma, gen: torch.Generator,
) -> dict[str, float]:
    """The training half of Flow-GRPO iteration ``step`` (what ``train_online`` runs and the GPU benchmark times).

    Advantages within each group of ``grpo_group_size`` consecutive samples, then ``grpo_inner_epochs`` passes
    over the samples in ``grpo_minibatches`` shuffled minibatches (order drawn from ``gen``), each one optimiser
    step on the loss of :func:`step_loss` averaged over the first ⌊steps · fraction⌋ denoising steps; then the
    EMA. ``cond`` holds one row per sample. Returns the loss, its parts and the gradient norm, means over updates.
    """
    n_train = train_timesteps(len(sigmas) - 1, cfg.grpo_timestep_fraction)
    advantages = group_advantages(rewards.view(-1, cfg.grpo_group_size), ADV_EPS, cfg.grpo_global_std)
    advantages = advantages.flatten().to(model.device)
    model.transformer.train()
    sums = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "abs_log_ratio": 0.0, "grad_norm": 0.0}
    updates = 0
    for _ in range(cfg.grpo_inner_epochs):
        order = torch.randperm(len(rewards), generator=gen)
        for idx in order.tensor_split(cfg.grpo_minibatches):
            if not len(idx):
                continue
            opt.zero_grad(set_to_none=True)
            for j in range(n_train):
                loss, parts = step_loss(model, traj, j, idx.to(model.device), cond, null, advantages, sigmas, cfg,
                                        guidance)
                (loss / n_train).backward()
                sums["loss"] += float(loss.detach()) / n_train
                for key, v in parts.items():
                    sums[key] += v / n_train
            sums["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            opt.step()
            updates += 1
    ema.update(lora_state(model.transformer), ema_decay(step, cfg.ema_rate, cfg.ema_max_decay))
    return {key: v / max(updates, 1) for key, v in sums.items()}


def pick_prompts(n_prompts: int, count: int, gen: torch.Generator) -> Tensor:
    """Distinct prompt indices when ``count`` ≤ the prompts available, else drawn with replacement."""
    if count <= n_prompts:
        return torch.randperm(n_prompts, generator=gen)[:count]
    return torch.randint(0, n_prompts, (count,), generator=gen)


@torch.no_grad()
def encode_prompts(model: FlowModel, prompts: Sequence[PromptRecord], batch_size: int) -> tuple[Condition, Condition]:
    """Conditioning of every prompt (rows aligned with ``prompts``) and of the empty prompt, on the CPU."""
    parts = [model.encode([p.prompt for p in prompts[i : i + batch_size]]) for i in range(0, len(prompts), batch_size)]
    cond = {k: torch.cat([p[k] for p in parts]).cpu() for k in parts[0]}
    return cond, {k: v.cpu() for k, v in model.encode([""]).items()}


def task_reward(task: Task, prompts: Sequence[PromptRecord]) -> RewardFn:
    """The task's reward as the score stage computes it; targets are looked up among ``prompts``."""
    records = {p.target: p for p in prompts}

    def reward(images: list[Image.Image], targets: list[str]) -> Tensor:
        table = task.reward(images, [records[t] for t in targets])
        return torch.tensor(table["reward"].to_numpy(dtype="float32"))

    return reward


def train_online(
    model: FlowModel,
    prompts: Sequence[PromptRecord],
    cond: Condition,
    null_cond: Condition,
    reward_fn: RewardFn,
    cfg: Train,
    ckpt_dir: Path,
    log: Logger,
    on_checkpoint: OnCheckpoint | None = None,
    eval_every: int = 0,
    *,
    guidance: float,
) -> dict[str, Tensor]:
    """Run ``cfg.steps`` iterations of the online objective (resuming from ``ckpt_dir``); return the EMA adapter.

    ``flow_grpo`` (any objective but the two below) samples SDE trajectories and trains on their
    log-likelihoods (:func:`update_policy`); ``diffusion_nft`` and ``awm`` sample with the ODE and train on the forward process
    (:func:`gdro_core.training.online_matching.update_matching`), DiffusionNFT from its sampling policy, which
    its checkpoints keep under ``old``. ``cond`` holds one row per prompt, ``null_cond`` the empty prompt;
    sampling and training use the CFG scale ``guidance``. ``on_checkpoint(iteration, ema_weights)`` runs every
    ``eval_every`` iterations and at the last. Logged per iteration: the loss and its parts, reward and the
    seconds spent generating, scoring and training.
    """
    if cond["pooled_projections"].shape[0] != len(prompts):
        raise ValueError(f"conditioning has {cond['pooled_projections'].shape[0]} rows for {len(prompts)} prompts")
    params, opt, gen, py_rng, ema, start = start_training(model, cfg, ckpt_dir)
    matching = cfg.objective in MATCHING_OBJECTIVES
    old = LoraEma(lora_state(model.transformer)) if cfg.objective == "diffusion_nft" else None
    if old is not None and start > 0:
        restore_extra(ckpt_dir, "old", old.shadow)
    sigmas = sigma_schedule(model, cfg.grpo_sample_steps)
    k = cfg.grpo_group_size
    null = {key: v.to(model.device) for key, v in null_cond.items()}
    for step in range(start + 1, cfg.steps + 1):
        t0 = time.perf_counter()
        chosen = pick_prompts(len(prompts), cfg.grpo_prompts_per_iteration, gen)
        rows = chosen.repeat_interleave(k)
        batch = {key: v[rows].to(model.device) for key, v in cond.items()}
        model.transformer.eval()
        if matching:
            final = sample_clean(model, batch, null, sigmas, guidance, gen, old)
        else:
            traj = sample_trajectories(model, batch, null, sigmas, cfg.grpo_eta, guidance, gen)
            final = traj.final
        with torch.no_grad():
            images = model.decode(final)
        t1 = time.perf_counter()
        rewards = torch.as_tensor(reward_fn(images, [prompts[int(i)].target for i in rows]), dtype=torch.float32)
        t2 = time.perf_counter()
        if matching:
            means = update_matching(model, final, batch, null, rewards, sigmas, cfg, guidance, step, params, opt, ema,
                                    gen, old)
        else:
            means = update_policy(model, traj, batch, null, rewards, sigmas, cfg, guidance, step, params, opt, ema,
                                  gen)
        t3 = time.perf_counter()
        if step % cfg.log_every == 0 or step == cfg.steps:
            metrics = {f"train/{key}": v for key, v in means.items()}
            metrics |= {"train/reward": float(rewards.mean()), "train/reward_std": float(rewards.std(unbiased=False))}
            metrics |= {"time/generation_s": t1 - t0, "time/scoring_s": t2 - t1, "time/training_s": t3 - t2}
            log(step, metrics)
        end_of_step(step, cfg, model, ema, opt, gen, py_rng, ckpt_dir, on_checkpoint, eval_every,
                    extra=None if old is None else {"old": old.shadow})
    model.transformer.eval()
    set_lora_state(model.transformer, ema.shadow)
    return ema.shadow
