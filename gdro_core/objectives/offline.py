"""Offline objectives over pre-scored groups: GDRO, Diffusion-DPO (plain, anchored, best-vs-worst-of-N), SFT.

- ``gdro``: Plackett-Luce over a random group of k, plus ``γ`` times the top-1 anchor.
- ``dpo``: Diffusion-DPO (Wallace et al. 2023) on the (best, worst) pair of the group, as its paper and
  official code define it: no anchor (γ is ignored) and pairs with equal rewards dropped.
- ``dpo_anchor``: ``dpo`` plus ``γ`` times the anchor on the winner (a variant, not Diffusion-DPO).
- ``offline_dpo``: the recipe public frameworks ship for offline preference data: for each prompt the best
  against the worst of all N frozen-model images of its pool; pools whose N rewards are all equal are skipped.
- ``sft_best``: flow matching on the group's best member only.
- ``lair``: every member's implicit reward regressed on centred softmax weights of the group's rewards, with a
  quadratic penalty on its size (Diffusion LAIR, arXiv 2605.26491); no anchor (γ is ignored).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gdro_core.models.base import Condition, FlowModel, velocity, with_transformer
from gdro_core.models.lora import reference
from gdro_core.models.sampling import initial_noise
from gdro_core.objectives.group_loss import dpo_loss, listwise_weighted_loss, plackett_luce_loss, sort_groups
from gdro_core.objectives.implicit_reward import (
    flow_matching_error, implicit_reward, interpolate, ranking_counts, velocity_norm_ratio,
)
from gdro_core.objectives.timesteps import sample_timesteps
from gdro_core.params import Train

PAIRWISE = ("dpo", "dpo_anchor", "offline_dpo")
OFFLINE_OBJECTIVES = ("gdro", *PAIRWISE, "sft_best", "lair")


def anchor_weight(cfg: Train) -> float:
    """Weight of ‖v − v_θ‖² on the best member: 1 for SFT, 0 for the DPO baselines and LAIR, γ for GDRO and
    dpo_anchor."""
    if cfg.objective == "sft_best":
        return 1.0
    if cfg.objective in ("dpo", "offline_dpo", "lair"):
        return 0.0
    return cfg.gamma


def draw_groups(rewards: Tensor, groups: int, k: int, mode: str, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Prompt indices (G,) and member indices (G, k) drawn from each prompt's pool of N."""
    n_prompts, n = rewards.shape
    if n < k:
        raise ValueError(f"pools hold {n} images per prompt but train.group_size is {k}")
    prompts = _draw_prompts(torch.arange(n_prompts), groups, gen)
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


def _draw_prompts(candidates: Tensor, groups: int, gen: torch.Generator) -> Tensor:
    """``groups`` of the candidate prompts: without replacement when there are enough of them."""
    if groups <= len(candidates):
        return candidates[torch.randperm(len(candidates), generator=gen)[:groups]]
    return candidates[torch.randint(0, len(candidates), (groups,), generator=gen)]


def best_worst_of_pool(rewards: Tensor, groups: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``offline_dpo``'s pairs: prompts whose pool is not all tied, and each one's (best, worst) of its N images.

    Ties for best or worst are broken uniformly at random (:func:`sort_groups`).
    """
    spread = rewards.amax(dim=1) > rewards.amin(dim=1)
    if not spread.any():
        raise ValueError("every prompt's pool has equal rewards: offline_dpo has no (best, worst) pair to train on")
    prompts = _draw_prompts(torch.nonzero(spread).squeeze(1), groups, gen)
    order = sort_groups(rewards[prompts], gen)
    return prompts, order[:, [0, -1]]


def draw_members(rewards: Tensor, cfg: Train, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """The prompts and members one training step uses, as ``cfg.objective`` defines its data."""
    if cfg.objective == "offline_dpo":
        return best_worst_of_pool(rewards, cfg.groups_per_step, gen)
    return draw_groups(rewards, cfg.groups_per_step, cfg.group_size, cfg.member_sampling, gen)


def seed_matrix(rows: list[dict], n_prompts: int, per_prompt: int) -> Tensor:
    """Each rollout image's sampler seed as a (P, N) tensor, from the manifest rows."""
    seeds = torch.full((n_prompts, per_prompt), -1, dtype=torch.long)
    for r in rows:
        if "seed" not in r:
            raise ValueError("rollout rows carry no 'seed': train.noise 'prior' needs rollouts made by `gdro rollout`")
        seeds[r["prompt_index"], r["member"]] = int(r["seed"])
    if (seeds < 0).any():
        raise ValueError("rollout manifest misses some images' seeds: rerun `gdro rollout`")
    return seeds


def prior_noise(seeds: Tensor, latent_shape: tuple[int, ...]) -> Tensor:
    """The initial noise x₁ each image was sampled from, regenerated from its seed: (G, k, *latent_shape)."""
    flat = initial_noise(seeds.flatten().tolist(), tuple(latent_shape))
    return flat.view(*seeds.shape, *latent_shape)


@dataclass(frozen=True)
class Draws:
    """The randomness of one step for a batch of groups: member order (ties shuffled) and shared (t, ε) per draw."""

    order: Tensor  # (G, k) indices sorting each group best first
    t: Tensor  # (D, G)
    noise: Tensor  # (D, G, C, H, W)
    member_noise: Tensor | None = None  # (G, k, C, H, W): each member's own prior noise (train.noise: prior)

    def rows(self, idx: slice) -> Draws:
        """The same draws for a slice of the groups (one process's or one micro-batch's share)."""
        own = None if self.member_noise is None else self.member_noise[idx]
        return Draws(self.order[idx], self.t[:, idx], self.noise[:, idx], own)


def draw_randomness(
    rewards: Tensor, item_shape: tuple[int, ...], cfg: Train, gen: torch.Generator, member_noise: Tensor | None = None,
) -> Draws:
    """Draw a step's (order, t, ε) for all G groups from ``gen``, so any split of the groups sees the same values.

    ``member_noise`` (G, k, C, H, W), each member's prior noise (:func:`prior_noise`), replaces the shared ε.
    """
    groups = rewards.shape[0]
    order = sort_groups(rewards, gen)
    ts, noises = [], []
    for _ in range(cfg.draws_per_group):
        ts.append(sample_timesteps(groups, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std, gen))
        noises.append(torch.randn((groups, *item_shape), generator=gen))
    if member_noise is not None and tuple(member_noise.shape) != (*rewards.shape, *item_shape):
        raise ValueError(f"prior noise {tuple(member_noise.shape)} does not match the groups {tuple(rewards.shape)}")
    return Draws(order, torch.stack(ts), torch.stack(noises), member_noise)


def group_objective(
    model: FlowModel, x0: Tensor, cond: Condition, rewards: Tensor, cfg: Train, gen: torch.Generator | None = None,
    *, draws: Draws | None = None, policy: torch.nn.Module | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Loss for groups ``x0`` (G, k, C, H, W) with explicit ``rewards`` (G, k); one t per group, and ε shared
    within a group or each member's own prior noise (``draws.member_noise``, ``train.noise: prior``).

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
    rows = torch.arange(groups).unsqueeze(1)
    rewards = torch.gather(rewards, 1, order)
    x0 = x0[rows, order]
    if cfg.objective in PAIRWISE:
        keep = torch.tensor([0, k - 1])
    elif cfg.objective == "sft_best":
        keep = torch.tensor([0])
    else:
        keep = torch.arange(k)
    x0, rewards = x0[:, keep], rewards[:, keep]
    own = None if draws.member_noise is None else draws.member_noise[rows, order][:, keep].flatten(0, 1)
    m = len(keep)
    untied = rewards[:, 0] > rewards[:, -1]  # pairwise objectives drop tied pairs
    x0f = x0.flatten(0, 1).to(model.device)
    condf = {key: v.to(model.device).repeat_interleave(m, 0) for key, v in cond.items()}
    total = torch.zeros((), device=model.device)
    parts = {"loss_main": 0.0, "loss_anchor": 0.0, "margin": 0.0, "ranking_hits": 0.0, "ranking_pairs": 0.0}
    if cfg.objective in PAIRWISE:
        parts["pairs_kept"] = float(untied.float().mean())
    if cfg.objective != "sft_best":
        parts["velocity_norm_ratio"] = 0.0
    n_draws = draws.t.shape[0]
    for d in range(n_draws):
        t = draws.t[d].repeat_interleave(m).to(model.device)
        if own is None:
            noise = draws.noise[d].unsqueeze(1).expand(-1, m, *x0.shape[2:]).flatten(0, 1)
        else:
            noise = own
        x_t, v = interpolate(x0f, noise.to(model.device), t)
        v_pol = velocity(forward, x_t, t, condf)
        err_pol = flow_matching_error(v, v_pol).view(groups, m)
        anchor = err_pol[:, 0].mean()
        if cfg.objective == "sft_best":
            main = torch.zeros((), device=model.device)
        else:
            with torch.no_grad(), reference(model.transformer):
                v_ref = velocity(model, x_t, t, condf)
            err_ref = flow_matching_error(v, v_ref).view(groups, m)
            s = implicit_reward(err_pol, err_ref, cfg.beta)
            if cfg.objective in PAIRWISE:
                main = dpo_loss(s[:, 0], s[:, 1], keep=untied.to(s.device))
            elif cfg.objective == "lair":
                main = listwise_weighted_loss(s, rewards.to(s.device), cfg.lair_tau, cfg.lair_lambda)
            else:
                main = plackett_luce_loss(s, rewards.to(s.device), cfg.tau, cfg.positions or None)
            hits, pairs = ranking_counts(s.detach().cpu(), rewards)
            parts["ranking_hits"] += hits
            parts["ranking_pairs"] += pairs
            parts["margin"] += float((s[:, 0] - s[:, -1]).detach().mean()) / n_draws
            parts["velocity_norm_ratio"] += float(velocity_norm_ratio(v_pol.detach(), v_ref)) / n_draws
        loss = main + anchor_weight(cfg) * anchor
        total = total + loss / n_draws
        parts["loss_main"] += float(main.detach()) / n_draws
        parts["loss_anchor"] += float(anchor.detach()) / n_draws
    parts["loss"] = float(total.detach())
    if parts["ranking_pairs"] > 0:
        parts["ranking_accuracy"] = parts["ranking_hits"] / parts["ranking_pairs"]
    return total, parts
