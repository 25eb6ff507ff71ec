"""Implicit reward of a rectified-flow model against its reference (method page §2)."""

from __future__ import annotations

from torch import Tensor


def flow_matching_error(v_target: Tensor, v_pred: Tensor) -> Tensor:
    """Per-sample ||v − v_pred||², the mean over latent elements (the scale that β multiplies)."""
    return (v_target.float() - v_pred.float()).pow(2).flatten(1).mean(dim=1)


def implicit_reward(err_policy: Tensor, err_reference: Tensor, beta: float) -> Tensor:
    """s_θ = −β (||v − v_θ||² − ||v − v_ref||²)."""
    return -beta * (err_policy - err_reference)


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """x_t = (1 − t) x_0 + t ε and its velocity target v = ε − x_0 (diffusers' FlowMatch convention)."""
    t_ = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t_) * x0 + t_ * noise, noise - x0


def ranking_counts(s: Tensor, rewards: Tensor) -> tuple[float, float]:
    """(pairs whose implicit rewards agree with the explicit order, strictly ordered pairs); ranking accuracy is
    their ratio. Groups whose rewards are all equal hold no ordered pair and add nothing."""
    ds = s.unsqueeze(-1) - s.unsqueeze(-2)
    pairs = (rewards.unsqueeze(-1) - rewards.unsqueeze(-2)) > 0
    return float((ds[pairs] > 0).sum()), float(pairs.sum())


def velocity_norm_ratio(v_policy: Tensor, v_reference: Tensor) -> Tensor:
    """Mean ‖v_θ‖ over mean ‖v_ref‖ at the same (x_t, t, c): a cheap reward-hacking signal.

    A policy that drifts toward saturated, oversized or high-contrast images predicts longer velocities
    than its reference; values well above 1 while the task reward rises deserve a look at the samples.
    """
    pol = v_policy.float().flatten(1).norm(dim=1).mean()
    ref = v_reference.float().flatten(1).norm(dim=1).mean()
    return pol / ref.clamp(min=1e-12)
