"""The online forward-process objectives, DiffusionNFT and AWM, on the shared online loop.

Both sample clean images with the deterministic ODE sampler, score them, normalise the rewards within each
group (as Flow-GRPO does) and then train on the *forward* process only: each sample is noised afresh,
x_t = (1 − t) x_0 + t ε, at ⌊grpo_sample_steps · grpo_timestep_fraction⌋ of the sampler's own timesteps (a random
subset per sample, as the DiffusionNFT reference does), and the loss compares velocities there. No sampler
likelihood is involved, so any sampler may produce x_0.

- ``diffusion_nft``: samples from the *sampling* ("old") policy, a copy of the adapter that follows the trained
  one by a soft update after every iteration (:func:`gdro_core.objectives.diffusion_nft.soft_update`), and
  minimises :func:`~gdro_core.objectives.diffusion_nft.nft_loss`.
- ``awm``: samples from the current policy and minimises :func:`gdro_core.objectives.awm.awm_loss`.

:func:`gdro_core.training.online_grpo.train_online` runs the iterations; the optimiser, EMA, checkpoints and the
checkpoint callback are the harness's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from gdro_core.models.base import Condition, FlowModel
from gdro_core.models.base import guided_velocity as family_guided_velocity
from gdro_core.models.lora import lora_state, reference, set_lora_state
from gdro_core.objectives.awm import awm_loss
from gdro_core.objectives.diffusion_nft import nft_loss, old_policy_decay, optimality_probability, soft_update
from gdro_core.objectives.flow_grpo import group_advantages
from gdro_core.objectives.implicit_reward import flow_matching_error, interpolate
from gdro_core.params import Train
from gdro_core.training.loop import LoraEma, ema_decay

MATCHING_OBJECTIVES = ("diffusion_nft", "awm")
ADV_EPS = 1e-4
"""ε in A = (r − mean) / (std + ε), the references' value."""


def _velocity(model: FlowModel, x: Tensor, t: Tensor, cond: Condition, null: Condition, guidance: float) -> Tensor:
    return family_guided_velocity(model, x, t.to(model.device, torch.float32), cond, null, guidance)


@contextmanager
def lora_weights(transformer: torch.nn.Module, state: dict[str, Tensor]) -> Iterator[None]:
    """The adapter temporarily holds ``state`` (e.g. the sampling policy); its own weights come back after."""
    live = {k: v.detach().clone() for k, v in lora_state(transformer).items()}
    with torch.no_grad():
        set_lora_state(transformer, state)
    try:
        yield
    finally:
        with torch.no_grad():
            set_lora_state(transformer, live)


@torch.no_grad()
def sample_ode(
    model: FlowModel, cond: Condition, null: Condition, sigmas: Tensor, guidance: float, gen: torch.Generator,
) -> Tensor:
    """One clean latent per conditioning row: Euler ODE steps x ← x + (σ_next − σ) v from x ~ N(0, I) (``gen``)."""
    n = cond["pooled_projections"].shape[0]
    x = torch.randn((n, *model.latent_shape), generator=gen).to(model.device)
    for i in range(len(sigmas) - 1):
        v = _velocity(model, x, sigmas[i].expand(n), cond, null, guidance)
        x = x + (sigmas[i + 1] - sigmas[i]).to(x) * v
    return x


def sample_clean(
    model: FlowModel, cond: Condition, null: Condition, sigmas: Tensor, guidance: float, gen: torch.Generator,
    old: LoraEma | None = None,
) -> Tensor:
    """The iteration's clean samples: from the sampling policy ``old`` when given (DiffusionNFT), else the policy."""
    if old is None:
        return sample_ode(model, cond, null, sigmas, guidance, gen)
    with lora_weights(model.transformer, old.shadow):
        return sample_ode(model, cond, null, sigmas, guidance, gen)


def matching_loss(
    model: FlowModel, x0: Tensor, t: Tensor, noise: Tensor, cond: Condition, null: Condition, advantages: Tensor,
    cfg: Train, guidance: float, old: LoraEma | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The objective's loss on samples ``x0`` (B, ...) noised to ``t`` (B,) with ``noise``; ``advantages`` (B,).

    DiffusionNFT needs ``old`` (the sampling policy, whose velocity is taken with the adapter holding its
    weights); the reference velocity (adapter off) is computed only when the KL weight is positive.
    """
    x_t, v_target = interpolate(x0, noise.to(x0), t.to(x0))
    kl_beta = cfg.nft_kl_beta if cfg.objective == "diffusion_nft" else cfg.awm_kl_beta
    v_ref = None
    if kl_beta > 0:
        with torch.no_grad(), reference(model.transformer):
            v_ref = _velocity(model, x_t, t, cond, null, guidance)
    if cfg.objective == "diffusion_nft":
        if old is None:
            raise ValueError("diffusion_nft needs the sampling policy's weights (old)")
        with torch.no_grad(), lora_weights(model.transformer, old.shadow):
            v_old = _velocity(model, x_t, t, cond, null, guidance)
        v_pol = _velocity(model, x_t, t, cond, null, guidance)
        r = optimality_probability(advantages, cfg.grpo_adv_clip_max).to(v_pol.device)
        return nft_loss(v_pol, v_old, v_target, t.to(v_pol.device), r, cfg.nft_beta, cfg.grpo_adv_clip_max,
                        v_ref, kl_beta)
    if cfg.objective == "awm":
        v_pol = _velocity(model, x_t, t, cond, null, guidance)
        return awm_loss(flow_matching_error(v_target, v_pol), advantages, cfg.grpo_adv_clip_max, v_pol, v_ref, kl_beta)
    raise ValueError(f"train.objective {cfg.objective!r} is not a forward-process objective")


def update_matching(
    model: FlowModel, x0: Tensor, cond: Condition, null: Condition, rewards: Tensor, sigmas: Tensor, cfg: Train,
    guidance: float, step: int, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, ema: LoraEma,
    gen: torch.Generator, old: LoraEma | None = None,
) -> dict[str, float]:
    """The training half of iteration ``step`` for DiffusionNFT or AWM (what ``train_online`` runs for them).

    Advantages within groups of ``grpo_group_size`` consecutive samples; ``grpo_inner_epochs`` passes over the
    samples in ``grpo_minibatches`` shuffled minibatches, each one optimiser step on the loss averaged over
    ⌊steps · fraction⌋ timesteps drawn per sample from the sampler's σ_0..σ_{S−1} without replacement, each
    with fresh noise (everything from ``gen``); then the EMA and, for DiffusionNFT, the soft update of ``old``
    with decay :func:`~gdro_core.objectives.diffusion_nft.old_policy_decay` of the optimiser steps taken so far.
    """
    steps = len(sigmas) - 1
    n_train = max(1, int(steps * cfg.grpo_timestep_fraction))
    advantages = group_advantages(rewards.view(-1, cfg.grpo_group_size), ADV_EPS, cfg.grpo_global_std).flatten()
    n = len(rewards)
    model.transformer.train()
    sums: dict[str, float] = {"loss": 0.0, "grad_norm": 0.0}
    updates = 0
    for _ in range(cfg.grpo_inner_epochs):
        order = torch.randperm(n, generator=gen)
        times = torch.stack([torch.randperm(steps, generator=gen)[:n_train] for _ in range(n)])
        for idx in order.tensor_split(cfg.grpo_minibatches):
            if not len(idx):
                continue
            opt.zero_grad(set_to_none=True)
            c = {k: v[idx.to(v.device)] for k, v in cond.items()}
            for j in range(n_train):
                t = sigmas[times[idx, j]]
                noise = torch.randn((len(idx), *x0.shape[1:]), generator=gen)
                loss, parts = matching_loss(model, x0[idx.to(x0.device)], t, noise, c, null, advantages[idx], cfg,
                                            guidance, old)
                (loss / n_train).backward()
                sums["loss"] += float(loss.detach()) / n_train
                for key, v in parts.items():
                    sums[key] = sums.get(key, 0.0) + v / n_train
            sums["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            opt.step()
            updates += 1
    live = lora_state(model.transformer)
    ema.update(live, ema_decay(step, cfg.ema_rate, cfg.ema_max_decay))
    means = {key: v / max(updates, 1) for key, v in sums.items()}
    if old is not None:
        per_iteration = cfg.grpo_inner_epochs * cfg.grpo_minibatches
        decay = old_policy_decay(step * per_iteration, cfg.nft_decay_flat, cfg.nft_decay_rate, cfg.nft_decay_max)
        soft_update(old.shadow, live, decay)
        means["old_decay"] = decay
    return means
