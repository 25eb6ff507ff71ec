"""The Flow-GRPO online baseline, as pure math (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via
Online RL", arXiv 2505.05470; reference code: github.com/yifan123/flow_grpo).

Same conventions as the rest of the library: x_σ = (1 − σ) x_0 + σ ε, v = ε − x_0, σ in [0, 1] with σ = 1 pure
noise, so sampling steps go from σ to σ_next < σ (dt = σ_next − σ < 0). Every per-sample quantity is a mean
over the non-batch dimensions, as in the reference code, which sets the scale of the clip range and of β_KL.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _per_sample(value: Tensor | float, like: Tensor) -> Tensor:
    """A scalar, (B,) or (B, 1, ..., 1) value as float32 (B, 1, ..., 1), to broadcast against ``like`` (B, ...)."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.numel() == 1:
        value = value.reshape(1).expand(like.shape[0])
    return value.reshape(-1, *([1] * (like.dim() - 1)))


def _mean_over_sample(x: Tensor) -> Tensor:
    """Mean over every dimension but the first."""
    return x.flatten(1).mean(dim=1)


def sde_step(
    x: Tensor,
    v: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    eta: float,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    sigma_max: Tensor | float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One Euler-Maruyama step of Flow-GRPO's marginal-preserving SDE, from σ to σ_next.

    Paper Eq. (SDE): dx = [v + σ_t²/(2t) (x + (1 − t) v)] dt + σ_t dw, with σ_t = η √(t / (1 − t)).
    Discretised exactly as ``sde_step_with_logprob`` (sde_type 'sde') in the reference file
    flow_grpo/diffusers_patch/sd3_sde_with_logprob.py, with dt = σ_next − σ and s_t = η √(σ / (1 − σ)):

        mean = x (1 + s_t² dt / (2σ)) + v (1 + s_t² (1 − σ) / (2σ)) dt
        std  = s_t √(−dt)
        x_next = mean + std · noise,   noise ~ N(0, I)

    At σ = 1, where s_t diverges, the reference replaces the denominator's σ by the schedule's second sigma
    (``sigmas[1]``); ``sigma_max`` is that value and defaults to ``sigma_next``, which is ``sigmas[1]`` at
    the only step that starts from σ = 1. η = 0 gives the Euler ODE step x + dt·v.

    ``noise`` (same shape as x) fixes the draw, e.g. to replay a trajectory; otherwise it is drawn from
    ``generator``. Computed in float32 (the reference notes bf16 overflows here). Returns (x_next, mean, std)
    with ``std`` per sample, shaped (B, 1, ..., 1).
    """
    x, v = x.float(), v.float()
    sigma_b, sigma_next_b = _per_sample(sigma, x), _per_sample(sigma_next, x)
    guard = _per_sample(sigma_next if sigma_max is None else sigma_max, x)
    dt = sigma_next_b - sigma_b
    std_dev_t = eta * torch.sqrt(sigma_b / (1 - torch.where(sigma_b == 1, guard, sigma_b)))
    mean = x * (1 + std_dev_t**2 / (2 * sigma_b) * dt) + v * (1 + std_dev_t**2 * (1 - sigma_b) / (2 * sigma_b)) * dt
    std = std_dev_t * torch.sqrt(-dt)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device)
    return mean + std * noise.to(mean), mean, std


def step_log_prob(x_next: Tensor, mean: Tensor, std: Tensor | float) -> Tensor:
    """log N(x_next; mean, std² I), per sample, as the **mean** over latent elements (not the sum).

    log p = −(x − μ)² / (2 std²) − log std − log √(2π) per element, averaged over non-batch dimensions,
    as the reference ``sde_step_with_logprob`` does; ``x_next`` is treated as data (detached), so
    gradients reach the policy through ``mean`` only.
    """
    std = _per_sample(std, mean)
    x_next = x_next.detach().float()
    elem = -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return _mean_over_sample(elem)


def group_advantages(rewards: Tensor, eps: float, global_std: bool = False) -> Tensor:
    """A = (r − mean_group(r)) / (std(r) + eps) for rewards (G, k), G groups of k samples of one prompt each.

    The std is the population std (ddof = 0, numpy's default, as the reference ``PerPromptStatTracker``),
    taken within each group, or over all G·k rewards with ``global_std`` (the reference's SD3 configs set
    ``sample.global_std = True``); the mean is always the group's.
    """
    rewards = rewards.float()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    std = rewards.std(unbiased=False) if global_std else rewards.std(dim=1, unbiased=False, keepdim=True)
    return centred / (std + eps)


def gaussian_kl(mean: Tensor, ref_mean: Tensor, std: Tensor | float) -> Tensor:
    """KL(N(mean, std²) ‖ N(ref_mean, std²)) = (mean − ref_mean)² / (2 std²), per sample, mean over elements.

    With ``std`` the step's std (σ_t √(−dt), as :func:`sde_step` returns) this is the paper's closed form
    ‖x̄_θ − x̄_ref‖² / (2 σ_t² Δt), per element. The reference training scripts divide by (2 σ_t²) instead,
    i.e. pass ``std = σ_t`` to reproduce them (their value is this KL times |dt|).
    """
    std = _per_sample(std, mean).flatten()
    return _mean_over_sample((mean.float() - ref_mean.float()) ** 2) / (2 * std**2)


def grpo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_range: float,
    kl: Tensor | None = None,
    kl_beta: float = 0.0,
    adv_clip_max: float | None = None,
) -> Tensor:
    """Clipped-ratio GRPO objective for one denoising step, as a loss to minimise.

    ρ = exp(log π_θ − log π_old); L = mean(max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε))) + β_KL · mean(KL)
    (reference: the training loop of scripts/train_sd3.py). ``adv_clip_max`` clamps A to
    [−adv_clip_max, adv_clip_max] first, as the reference does (``train.adv_clip_max``); None leaves it.
    """
    if adv_clip_max is not None:
        advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    if kl is not None and kl_beta:
        loss = loss + kl_beta * kl.mean()
    return loss
