"""The SD3 / SD3.5 family: diffusers' StableDiffusion3Pipeline (CLIP-L + CLIP-G + T5, 16-channel VAE latents)."""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from torch import Tensor

from gdro_core.models.base import Condition
from gdro_core.models.family import DiffusersFlowModel

SD3_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
"""The attention projections diffusers' SD3 LoRA training script targets."""


def sd3_velocity(model, x: Tensor, t: Tensor, cond: Condition) -> Tensor:
    """SD3 transformers take the timestep scaled to [0, 1000] and the pooled text projection."""
    return model.transformer(
        hidden_states=x.to(model.device, model.dtype),
        encoder_hidden_states=cond["encoder_hidden_states"].to(model.device, model.dtype),
        pooled_projections=cond["pooled_projections"].to(model.device, model.dtype),
        timestep=(t.to(model.device, torch.float32) * 1000).to(model.dtype),
        return_dict=False,
    )[0]


def sd3_timesteps(model, scheduler, steps: int) -> None:
    """As StableDiffusion3Pipeline: ``steps`` timesteps; mu from the latent size if the scheduler shifts dynamically."""
    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting", False):
        patch = model.transformer.config.patch_size
        seq = (model.latent_shape[1] // patch) * (model.latent_shape[2] // patch)
        c = scheduler.config
        kwargs["mu"] = calculate_shift(seq, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                       c.get("base_shift", 0.5), c.get("max_shift", 1.16))
    scheduler.set_timesteps(steps, device=model.device, **kwargs)


class StableDiffusion3Model(DiffusersFlowModel):
    """A real SD3/SD3.5 checkpoint; guidance is classifier-free (the empty prompt as the unconditional branch)."""

    family = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    transformer_class = SD3Transformer2DModel
    lora_targets = SD3_TARGETS

    def __init__(self, pipe, height: int, width: int, source: str = "", **kwargs):
        f = pipe.vae_scale_factor
        super().__init__(pipe, (pipe.transformer.config.in_channels, height // f, width // f), source, **kwargs)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Condition:
        self.component("text_encoder")
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def velocity(self, x: Tensor, t: Tensor, cond: Condition, guidance: float | None = None) -> Tensor:
        return sd3_velocity(self, x, t, cond)

    def set_timesteps(self, scheduler, steps: int) -> None:
        sd3_timesteps(self, scheduler, steps)


StableDiffusion3Adapter = StableDiffusion3Model
