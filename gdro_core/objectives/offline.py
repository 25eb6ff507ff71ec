"""Offline objectives over pre-scored groups: GDRO, Diffusion-DPO and best-of-group SFT."""

from __future__ import annotations

import torch
from torch import Tensor

from gdro_core.models.base import Condition, FlowModel, velocity
from gdro_core.objectives.group_loss import dpo_loss, plackett_luce_loss, sort_groups
from gdro_core.objectives.implicit_reward import flow_matching_error, implicit_reward, interpolate, ranking_accuracy
from gdro_core.models.lora import reference
from gdro_core.params import Train
from gdro_core.objectives.timesteps import sample_timesteps


def draw_groups(rewards: Tensor, groups: int, k: int, mode: str, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Prompt indices (G,) and member indices (G, k) drawn from each prompt's pool of N."""
    n_prompts, n = rewards.shape
    if n < k:
        raise ValueError(f"pools hold {n} images per prompt but train.group_size is {k}")
    if groups <= n_prompts:
        prompts = torch.randperm(n_prompts, generator=gen)[:groups]
    else:
        prompts = torch.randint(0, n_prompts, (groups,), generator=gen)
    if mode == "random":
        members = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(groups)])
    elif mode == "stratified":
        # one member from each of k reward strata, so every group spans its pool's range
        ranked = torch.argsort(rewards[prompts], dim=1, descending=True)
        bounds = torch.linspace(0, n, k + 1).long()
        picks = [bounds[i] + torch.randint(0, int(bounds[i + 1] - bounds[i]), (groups,), generator=gen) for i in range(k)]
        members = torch.gather(ranked, 1, torch.stack(picks, dim=1))
    else:
        raise ValueError(f"unknown train.member_sampling {mode!r}")
    return prompts, members


def group_objective(
    model: FlowModel, x0: Tensor, cond: Condition, rewards: Tensor, cfg: Train, gen: torch.Generator
) -> tuple[Tensor, dict[str, float]]:
    """Loss for groups ``x0`` (G, k, C, H, W) with explicit ``rewards`` (G, k); (t, ε) shared within a group."""
    groups, k = rewards.shape
    if k == 0:
        raise ValueError("empty group: every group needs at least one member")
    order = sort_groups(rewards, gen)
    rewards = torch.gather(rewards, 1, order)
    x0 = x0[torch.arange(groups).unsqueeze(1), order]
    if cfg.objective == "dpo":
        keep = torch.tensor([0, k - 1])
    elif cfg.objective == "sft_best":
        keep = torch.tensor([0])
    else:
        keep = torch.arange(k)
    x0, rewards = x0[:, keep], rewards[:, keep]
    m = len(keep)
    x0f = x0.flatten(0, 1).to(model.device)
    condf = {key: v.to(model.device).repeat_interleave(m, 0) for key, v in cond.items()}
    total = torch.zeros((), device=model.device)
    parts = {"loss_main": 0.0, "loss_anchor": 0.0, "ranking_accuracy": 0.0, "margin": 0.0}
    for _ in range(cfg.draws_per_group):
        t = sample_timesteps(groups, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std, gen).repeat_interleave(m)
        noise = torch.randn((groups, 1, *x0.shape[2:]), generator=gen).expand(-1, m, *x0.shape[2:]).flatten(0, 1)
        x_t, v = interpolate(x0f, noise.to(model.device), t.to(model.device))
        err_pol = flow_matching_error(v, velocity(model, x_t, t.to(model.device), condf)).view(groups, m)
        anchor = err_pol[:, 0].mean()
        if cfg.objective == "sft_best":
            main = torch.zeros((), device=model.device)
        else:
            with torch.no_grad(), reference(model.transformer):
                err_ref = flow_matching_error(v, velocity(model, x_t, t.to(model.device), condf)).view(groups, m)
            s = implicit_reward(err_pol, err_ref, cfg.beta)
            if cfg.objective == "dpo":
                main = dpo_loss(s[:, 0], s[:, 1])
            else:
                main = plackett_luce_loss(s, rewards.to(s.device), cfg.tau, cfg.positions or None)
            acc = ranking_accuracy(s.detach().cpu(), rewards)
            parts["ranking_accuracy"] += float(acc) / cfg.draws_per_group
            parts["margin"] += float((s[:, 0] - s[:, -1]).mean()) / cfg.draws_per_group
        loss = main + (1.0 if cfg.objective == "sft_best" else cfg.gamma) * anchor
        total = total + loss / cfg.draws_per_group
        parts["loss_main"] += float(main) / cfg.draws_per_group
        parts["loss_anchor"] += float(anchor) / cfg.draws_per_group
    parts["loss"] = float(total)
    return total, parts
