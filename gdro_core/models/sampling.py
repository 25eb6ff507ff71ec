"""Deterministic ODE sampling with diffusers' FlowMatch Euler scheduler, exactly as each family's pipeline samples.

The initial noise of image ``i`` is drawn from its own ``torch.Generator().manual_seed(seeds[i])`` on the CPU
in float32, in the latents' natural (C, H, W) form, which is what StableDiffusion3Pipeline and FluxPipeline
draw when given ``generator=[torch.Generator().manual_seed(s) for s in seeds]`` (FLUX packs after drawing).
Timesteps come from the family (:meth:`FlowModel.sampling_scheduler`), guidance from the family
(classifier-free, or FLUX.1-dev's embedded guidance), so the same seeds, steps and guidance give the
pipeline's images.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gdro_core.models.base import Condition, FlowModel, guided_velocity
from gdro_core.models.family import concat, expand  # noqa: F401 - re-exported for callers

__all__ = ["concat", "expand", "initial_noise", "sample"]


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> Tensor:
    """One generator per sample, so an image depends on its own seed only, not on batching."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample(
    model: FlowModel, cond: Condition, null_cond: Condition, seeds: list[int], steps: int, guidance: float,
    latents: Tensor | None = None,
) -> Tensor:
    """Clean latents x_0 from noise x_1 by Euler steps of the probability-flow ODE (``latents``: x_1 given)."""
    scheduler = model.sampling_scheduler(steps)
    x = initial_noise(seeds, model.latent_shape) if latents is None else latents
    x = x.to(model.device, torch.float32)
    for i, t in enumerate(scheduler.timesteps):
        v = guided_velocity(model, x, scheduler.sigmas[i].to(model.device), cond, null_cond, guidance)
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return x
