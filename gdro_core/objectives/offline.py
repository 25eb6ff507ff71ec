"""Offline objectives over pre-scored groups: GDRO, Diffusion-DPO and best-of-group SFT."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gdro_core.models.base import Condition, FlowModel, velocity, with_transformer
from gdro_core.objectives.group_loss import dpo_loss, plackett_luce_loss, sort_groups
from gdro_core.objectives.implicit_reward import flow_matching_error, implicit_reward, interpolate, ranking_counts
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


@dataclass(frozen=True)
class Draws:
    """The randomness of one step for a batch of groups: member order (ties shuffled) and shared (t, ε) per draw."""

    order: Tensor  # (G, k) indices sorting each group best first
    t: Tensor  # (D, G)
    noise: Tensor  # (D, G, C, H, W)

    def rows(self, idx: slice) -> Draws:
        """The same draws for a slice of the groups (one process's or one micro-batch's share)."""
        return Draws(self.order[idx], self.t[:, idx], self.noise[:, idx])


def draw_randomness(rewards: Tensor, item_shape: tuple[int, ...], cfg: Train, gen: torch.Generator) -> Draws:
    """Draw a step's (order, t, ε) for all G groups from ``gen``, so any split of the groups sees the same values."""
    groups = rewards.shape[0]
    order = sort_groups(rewards, gen)
    ts, noises = [], []
    for _ in range(cfg.draws_per_group):
        ts.append(sample_timesteps(groups, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std, gen))
        noises.append(torch.randn((groups, *item_shape), generator=gen))
    return Draws(order, torch.stack(ts), torch.stack(noises))


def group_objective(
    model: FlowModel, x0: Tensor, cond: Condition, rewards: Tensor, cfg: Train, gen: torch.Generator | None = None,
    *, draws: Draws | None = None, policy: torch.nn.Module | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Loss for groups ``x0`` (G, k, C, H, W) with explicit ``rewards`` (G, k); (t, ε) shared within a group.

    The randomness comes from ``draws`` when given (see :func:`draw_randomness`), else from ``gen``. ``policy``
    is the module the policy pass runs through (a DDP wrapper of ``model.transformer``); the reference pass
    switches the adapter off on ``model.transformer`` itself. ``parts`` holds means over these groups, and
    ``ranking_hits`` / ``ranking_pairs`` as counts, so shares of a batch can be summed.
    """
    groups, k = rewards.shape
    if k == 0:
        raise ValueError("empty group: every group needs at least one member")
    if draws is None:
        if gen is None:
            raise ValueError("group_objective needs either draws or a generator")
        draws = draw_randomness(rewards, tuple(x0.shape[2:]), cfg, gen)
    forward = model if policy is None else with_transformer(model, policy)
    order = draws.order
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
    parts = {"loss_main": 0.0, "loss_anchor": 0.0, "margin": 0.0, "ranking_hits": 0.0, "ranking_pairs": 0.0}
    n_draws = draws.t.shape[0]
    for d in range(n_draws):
        t = draws.t[d].repeat_interleave(m).to(model.device)
        noise = draws.noise[d].unsqueeze(1).expand(-1, m, *x0.shape[2:]).flatten(0, 1)
        x_t, v = interpolate(x0f, noise.to(model.device), t)
        err_pol = flow_matching_error(v, velocity(forward, x_t, t, condf)).view(groups, m)
        anchor = err_pol[:, 0].mean()
        if cfg.objective == "sft_best":
            main = torch.zeros((), device=model.device)
        else:
            with torch.no_grad(), reference(model.transformer):
                err_ref = flow_matching_error(v, velocity(model, x_t, t, condf)).view(groups, m)
            s = implicit_reward(err_pol, err_ref, cfg.beta)
            if cfg.objective == "dpo":
                main = dpo_loss(s[:, 0], s[:, 1])
            else:
                main = plackett_luce_loss(s, rewards.to(s.device), cfg.tau, cfg.positions or None)
            hits, pairs = ranking_counts(s.detach().cpu(), rewards)
            parts["ranking_hits"] += hits
            parts["ranking_pairs"] += pairs
            parts["margin"] += float((s[:, 0] - s[:, -1]).detach().mean()) / n_draws
        loss = main + (1.0 if cfg.objective == "sft_best" else cfg.gamma) * anchor
        total = total + loss / n_draws
        parts["loss_main"] += float(main.detach()) / n_draws
        parts["loss_anchor"] += float(anchor.detach()) / n_draws
    parts["loss"] = float(total.detach())
    if parts["ranking_pairs"] > 0:
        parts["ranking_accuracy"] = parts["ranking_hits"] / parts["ranking_pairs"]
    return total, parts
