"""A tiny built-in model and a synthetic rollout pool, shared by the training tests and their torchrun script."""

import torch

from gdro_core.data.rollout import Rollouts
from gdro_core.models.builtin import BuiltinModelAdapter, build_builtin_pipeline
from gdro_core.params import Params


def tiny_model(p: Params) -> BuiltinModelAdapter:
    pipe = build_builtin_pipeline(p.model.builtin, p.image_shape, p.sampler.shift, seed=0)
    return BuiltinModelAdapter(pipe, (p.world.height, p.world.width))


def tiny_data(p: Params, n_prompts: int = 3, n: int = 4) -> tuple[Rollouts, torch.Tensor]:
    """Random latents, real prompt conditioning from the tiny encoder, random rewards."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(n_prompts, n, 1, p.world.height, p.world.width, generator=g)
    with torch.no_grad():
        cond = tiny_model(p).encode([f'a sign "{i}{i}{i}"' for i in range(n_prompts)])
    rows = [{"prompt_index": i, "member": m} for i in range(n_prompts) for m in range(n)]
    return Rollouts(latents=latents, cond=cond, rows=rows), torch.rand(n_prompts, n, generator=g)
