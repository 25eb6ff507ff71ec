"""Advantage Weighted Matching, as pure math (Xue et al. 2025, "Advantage Weighted Matching: Aligning RL with
Pretraining in Diffusion Models", arXiv 2509.25050).

AWM keeps the pretraining loss and only reweights it: each online sample's flow-matching error at a forward-noised
x_t = (1 − t) x_0 + t ε is weighted by the sample's group advantage, so the update is the score-matching
gradient scaled by A instead of the high-variance sampler likelihood of policy-gradient methods.
"""

from __future__ import annotations

import torch
from torch import Tensor


def awm_loss(
    err_policy: Tensor, advantages: Tensor, adv_clip_max: float | None = None,
    v_policy: Tensor | None = None, v_ref: Tensor | None = None, kl_beta: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """L = mean_i A_i ‖v_θ(x_t) − (ε − x_0)‖² + β_KL · mean_i ‖v_θ − v_ref‖² (squared errors: element means).

    ``err_policy`` (B,) is :func:`gdro_core.objectives.implicit_reward.flow_matching_error`; A is clamped to
    [−adv_clip_max, adv_clip_max] first (None leaves it). Minimising A · err raises the likelihood surrogate
    −err of above-average samples and lowers that of below-average ones. The regulariser is the velocity-space
    KL to the reference (adapter off) that public AWM implementations use (``kl_type 'v-based'``); it is left
    out when ``v_ref`` is None or β_KL = 0.
    """
    a = advantages.float()
    if adv_clip_max is not None:
        a = a.clamp(-adv_clip_max, adv_clip_max)
    policy = (a.to(err_policy.device) * err_policy).mean()
    loss = policy
    kl = torch.zeros((), device=policy.device)
    if v_ref is not None and v_policy is not None and kl_beta:
        kl = (v_policy.float() - v_ref.detach().float()).pow(2).flatten(1).mean(dim=1).mean()
        loss = loss + kl_beta * kl
    return loss, {"policy_loss": float(policy.detach()), "kl": float(kl.detach())}
