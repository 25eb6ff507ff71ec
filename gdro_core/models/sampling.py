"""Deterministic ODE sampling with diffusers' FlowMatch Euler scheduler and classifier-free guidance."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor

from gdro_core.models.base import Condition, FlowModel, velocity


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> Tensor:
    """One generator per sample, so an image depends on its own seed only, not on batching."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def expand(cond: Condition, n: int) -> Condition:
    """Repeat a single-row condition (e.g. the empty prompt) to ``n`` rows."""
    return {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}


def concat(a: Condition, b: Condition) -> Condition:
    return {k: torch.cat([a[k], b[k]]) for k in a}


@torch.no_grad()
def sample(
    model: FlowModel, cond: Condition, null_cond: Condition, seeds: list[int], steps: int, guidance: float
) -> Tensor:
    """Clean latents x_0 from noise x_1 by Euler steps of the probability-flow ODE."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config)
    scheduler.set_timesteps(steps, device=model.device)
    x = initial_noise(seeds, model.latent_shape).to(model.device, torch.float32)
    n = x.shape[0]
    use_cfg = guidance > 1.0
    both = concat(cond, expand(null_cond, n)) if use_cfg else cond
    for t in scheduler.timesteps:
        tt = (t / 1000).expand(n)
        if use_cfg:
            v_c, v_u = velocity(model, torch.cat([x, x]), torch.cat([tt, tt]), both).float().chunk(2)
            v = v_u + guidance * (v_c - v_u)
        else:
            v = velocity(model, x, tt, both).float()
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return x
