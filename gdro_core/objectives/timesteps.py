"""Training timestep distributions, via diffusers' SD3 density sampler."""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling
from torch import Tensor


def sample_timesteps(
    n: int, scheme: str, logit_mean: float, logit_std: float, generator: torch.Generator
) -> Tensor:
    """t in (0, 1): 'uniform' or 'logit_normal' (SD3 paper §3.1, t = sigmoid(N(m, s))), drawn from ``generator`` only."""
    if scheme == "uniform":
        return torch.rand(n, generator=generator)
    return compute_density_for_timestep_sampling(
        weighting_scheme=scheme, batch_size=n, logit_mean=logit_mean, logit_std=logit_std, generator=generator
    )
