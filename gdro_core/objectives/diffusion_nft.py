"""DiffusionNFT, as pure math (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward
Process", arXiv 2509.16117; reference code: github.com/NVlabs/DiffusionNFT, scripts/train_nft_sd3.py).

Same conventions as the rest of the library: x_t = (1 − t) x_0 + t ε, v = ε − x_0, t in [0, 1] with t = 1 pure
noise. The policy is trained on the forward process only: clean samples x_0 of the sampling ("old") policy are
noised again and both policies' velocities are compared there; no sampler likelihood is needed.
"""

from __future__ import annotations

import torch
from torch import Tensor

WEIGHT_FLOOR = 1e-5
"""Lower bound of the adaptive weight (the reference's ``clip(min=0.00001)``)."""


def optimality_probability(advantages: Tensor, adv_clip_max: float) -> Tensor:
    """r = clip(A, ±m) / (2m) + 1/2 in [0, 1]: the probability that a sample is "optimal".

    The reference maps its group-normalised advantage A, clamped to [−m, m] (``train.adv_clip_max``), linearly
    onto [0, 1]; A = 0 (an average sample) gives r = 1/2, equal pull towards the positive and negative policies.
    """
    a = advantages.float().clamp(-adv_clip_max, adv_clip_max)
    return (a / adv_clip_max / 2.0 + 0.5).clamp(0.0, 1.0)


def implicit_policies(v_policy: Tensor, v_old: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(v⁺, v⁻) = ((1 − β) v_old + β v_θ, (1 + β) v_old − β v_θ): the implicit positive and negative policies.

    They sit symmetrically around the sampling policy v_old (detached); training v⁺ towards the good samples
    and v⁻ towards the bad ones moves v_θ along the reward direction (paper §3, reference lines
    ``positive_prediction`` / ``implicit_negative_prediction``).
    """
    v_old = v_old.detach().float()
    v_policy = v_policy.float()
    return beta * v_policy + (1 - beta) * v_old, (1 + beta) * v_old - beta * v_policy


def adaptive_x0_error(v: Tensor, v_target: Tensor, t: Tensor) -> Tensor:
    """‖x̂_0 − x_0‖² / sg(mean |x̂_0 − x_0|), per sample, means over the latent elements.

    x̂_0 = x_t − t v, so x̂_0 − x_0 = t (v_target − v). The reference divides the x_0-prediction error by its own
    detached mean absolute value (floored at 1e-5): an adaptive weight that makes the loss scale-free across t.
    """
    t_ = t.float().reshape(-1, *([1] * (v.dim() - 1)))
    diff = t_ * (v.float() - v_target.float())
    weight = diff.detach().abs().flatten(1).mean(dim=1).clamp(min=WEIGHT_FLOOR)
    return diff.pow(2).flatten(1).mean(dim=1) / weight


def nft_loss(
    v_policy: Tensor, v_old: Tensor, v_target: Tensor, t: Tensor, r: Tensor, beta: float, adv_clip_max: float,
    v_ref: Tensor | None = None, kl_beta: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """DiffusionNFT's loss on forward-noised samples, as the reference computes it.

    L = m · mean_i [r_i ℓ(v⁺_i) + (1 − r_i) ℓ(v⁻_i)] / β + β_KL · mean_i ‖v_θ − v_ref‖²,
    with ℓ :func:`adaptive_x0_error`, (v⁺, v⁻) :func:`implicit_policies`, r :func:`optimality_probability`
    and m = ``adv_clip_max`` (the reference multiplies by it). The KL term is the reference's velocity-space
    penalty against the base model (``train.beta``); it is left out when ``v_ref`` is None or β_KL = 0.
    Returns the loss and its parts (policy loss, KL, mean ‖v_θ − v_old‖²).
    """
    v_pos, v_neg = implicit_policies(v_policy, v_old, beta)
    per_sample = r * adaptive_x0_error(v_pos, v_target, t) + (1 - r) * adaptive_x0_error(v_neg, v_target, t)
    policy = (per_sample / beta * adv_clip_max).mean()
    loss = policy
    kl = torch.zeros((), device=policy.device)
    if v_ref is not None and kl_beta:
        kl = (v_policy.float() - v_ref.detach().float()).pow(2).flatten(1).mean(dim=1).mean()
        loss = loss + kl_beta * kl
    parts = {
        "policy_loss": float(policy.detach()),
        "kl": float(kl.detach()),
        "old_deviation": float((v_policy.detach().float() - v_old.float()).pow(2).mean()),
    }
    return loss, parts


def old_policy_decay(updates: int, flat: int, rate: float, max_decay: float) -> float:
    """Decay of the sampling policy's soft update after ``updates`` optimiser steps: 0 before ``flat``, then
    min((updates − flat) · rate, max_decay) (the reference's ``return_decay``; its decay_type 1 is
    (0, 0.001, 0.5), decay_type 2 (75, 0.0075, 0.999), decay_type 0 always 0: the old policy is the current one).
    """
    if updates < flat:
        return 0.0
    return min((updates - flat) * rate, max_decay)


@torch.no_grad()
def soft_update(old: dict[str, Tensor], live: dict[str, Tensor], decay: float) -> None:
    """θ_old ← decay · θ_old + (1 − decay) · θ, in place (the reference's update of its "old" adapter)."""
    for k, v in live.items():
        old[k].mul_(decay).add_(v.detach().to(old[k]), alpha=1.0 - decay)
