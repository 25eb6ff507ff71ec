"""Group losses over implicit rewards (method page §3).

All functions take tensors shaped ``(groups, k)`` whose members are already sorted by explicit
reward, best first (see :func:`sort_groups`). They are pure and differentiable in ``s``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sort_groups(rewards: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Indices that sort each group by reward, best first; tied members in random order.

    Ties are broken by a random shuffle before a stable sort, so every order of tied members is
    equally likely and the expected loss is symmetric in them.
    """
    groups, k = rewards.shape
    shuffle = torch.argsort(torch.rand(groups, k, generator=generator), dim=1)
    shuffled = torch.gather(rewards, 1, shuffle)
    order = torch.argsort(shuffled, dim=1, descending=True, stable=True)
    return torch.gather(shuffle, 1, order)


def plackett_luce_targets(rewards: Tensor, tau: float) -> Tensor:
    """q_i(j) = softmax_{j>=i}(r_j / τ) for every rank position i: shape (groups, k, k).

    τ = 0 is the limit τ → 0: uniform mass on the members tied for the best remaining reward.
    """
    k = rewards.shape[-1]
    remaining = torch.ones(k, k, dtype=torch.bool, device=rewards.device).triu()  # [i, j]: j >= i
    r = rewards.unsqueeze(-2).expand(*rewards.shape[:-1], k, k)
    if tau > 0:
        logits = (r / tau).masked_fill(~remaining, float("-inf"))
        return torch.softmax(logits, dim=-1)
    best = r.masked_fill(~remaining, float("-inf")).amax(dim=-1, keepdim=True)
    hits = (r == best) & remaining
    return hits.float() / hits.sum(dim=-1, keepdim=True)


def plackett_luce_loss(s: Tensor, rewards: Tensor, tau: float, positions: int | None = None) -> Tensor:
    """L_GDRO = Σ_{i<k} [logsumexp_{m>=i} s_m − Σ_{j>=i} q_i(j) s_j], mean over groups.

    ``positions`` limits the sum to the first rank positions (1 gives the top-1 cross-entropy);
    ``None`` uses all k − 1 of them.
    """
    k = s.shape[-1]
    if k < 2:
        raise ValueError(f"a group needs at least 2 members to rank, got k={k}")
    n = k - 1 if positions is None else min(positions, k - 1)
    q = plackett_luce_targets(rewards, tau)[..., :n, :]
    remaining = torch.ones(k, k, dtype=torch.bool, device=s.device).triu()[:n]
    scores = s.unsqueeze(-2).expand(*s.shape[:-1], n, k)
    lse = torch.logsumexp(scores.masked_fill(~remaining, float("-inf")), dim=-1)
    expected = (q * scores.masked_fill(~remaining, 0.0)).sum(dim=-1)
    return (lse - expected).sum(dim=-1).mean()


def dpo_loss(s_win: Tensor, s_lose: Tensor, keep: Tensor | None = None) -> Tensor:
    """Diffusion-DPO: −log σ(s_w − s_l), mean over the pairs ``keep`` marks (all when ``None``).

    With s = −β(‖v − v_θ‖² − ‖v − v_ref‖²) and squared errors as means over latent elements, s_w − s_l is
    the official code's ``−0.5 · beta_dpo · (model_diff − ref_diff)`` with ``beta_dpo = 2β``. Dropped pairs
    (tied rewards: no preference) contribute nothing; with none kept the loss is 0, still attached to ``s``.
    """
    losses = -F.logsigmoid(s_win - s_lose)
    if keep is None:
        return losses.mean()
    if keep.shape != losses.shape:
        raise ValueError(f"keep mask {tuple(keep.shape)} does not match the pairs {tuple(losses.shape)}")
    keep = keep.to(losses.dtype)
    return (losses * keep).sum() / keep.sum().clamp(min=1.0)


def centred_softmax_weights(rewards: Tensor, tau: float) -> Tensor:
    """w_i = softmax_j(r_j / τ)_i − 1/k within each group (G, k): weights that sum to zero over the group.

    Above-average members (by the softmax of their rewards) get positive weight, the rest negative; a group of
    equal rewards gets w ≡ 0 and carries no signal. τ = 0 is the limit τ → 0: uniform mass on the best members.
    """
    k = rewards.shape[-1]
    if tau > 0:
        p = torch.softmax(rewards.float() / tau, dim=-1)
    else:
        best = rewards == rewards.amax(dim=-1, keepdim=True)
        p = best.float() / best.sum(dim=-1, keepdim=True)
    return p - 1.0 / k


def listwise_weighted_loss(s: Tensor, rewards: Tensor, tau: float, lam: float) -> Tensor:
    """L = Σ_i [−w_i s_i + (λ/2) s_i²], mean over groups, with w :func:`centred_softmax_weights`.

    An advantage-weighted regression on the implicit reward s with a quadratic penalty on its size (the
    listwise objective of Diffusion LAIR, arXiv 2605.26491): every member of a group contributes, and the
    per-member optimum s_i* = w_i / λ is bounded, so losers are pushed down only so far (a plain −Σ w_i s_i
    is unbounded below). Members need not be sorted.
    """
    w = centred_softmax_weights(rewards.to(s.device), tau)
    return (-w * s + 0.5 * lam * s.pow(2)).sum(dim=-1).mean()
