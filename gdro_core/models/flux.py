"""The FLUX.1 family (dev and schnell): diffusers' FluxPipeline.

Latents are kept in their natural unpacked (B, 16, H/8, W/8) form everywhere (rollouts, losses);
the velocity packs them into 2x2 patches with their image ids, as FluxPipeline does, and unpacks the
prediction. Guidance-distilled checkpoints (FLUX.1-dev, ``guidance_embeds``) take the guidance
scale as an input embedding; the others (FLUX.1-schnell) use true classifier-free guidance with the
empty prompt as negative when guidance > 1 (FluxPipeline's ``true_cfg_scale`` with ``negative_prompt=""``).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch import Tensor

from gdro_core.models.base import Condition
from gdro_core.models.family import DiffusersFlowModel

FLUX_TARGETS = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj",
    "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
)
"""As diffusers' FLUX LoRA training script: attention, feed-forward and the single blocks' proj_mlp (their
proj_out is named per block in :meth:`FluxModel.default_lora_targets`: a bare ``proj_out`` would also adapt
the transformer's own output layer)."""

FLUX_DEFAULT_GUIDANCE = 3.5
"""FluxPipeline's default guidance scale: the embedded guidance when none is given."""


class FluxModel(DiffusersFlowModel):
    family = "flux"
    pipeline_class = FluxPipeline
    transformer_class = FluxTransformer2DModel
    lora_targets = FLUX_TARGETS

    @classmethod
    def default_lora_targets(cls, transformer: torch.nn.Module) -> list[str]:
        blocks = len(transformer.single_transformer_blocks)
        return [*cls.lora_targets, *(f"single_transformer_blocks.{i}.proj_out" for i in range(blocks))]

    def __init__(self, pipe, height: int, width: int, source: str = "", **kwargs):
        f = pipe.vae_scale_factor
        super().__init__(pipe, (pipe.transformer.config.in_channels // 4, height // f, width // f), source, **kwargs)
        self.embedded_guidance = bool(pipe.transformer.config.guidance_embeds)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Condition:
        self.component("text_encoder")
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def velocity(self, x: Tensor, t: Tensor, cond: Condition, guidance: float | None = None) -> Tensor:
        """Pack x, add text/image ids (and the guidance embedding of guidance-distilled checkpoints), unpack v."""
        b, c, h, w = x.shape
        f = self.pipe.vae_scale_factor
        dev, dt = self.device, self.dtype
        hidden = cond["encoder_hidden_states"].to(dev, dt)
        g = None
        if self.embedded_guidance:
            scale = guidance if guidance is not None else (self.default_guidance or FLUX_DEFAULT_GUIDANCE)
            g = torch.full((b,), float(scale), device=dev, dtype=torch.float32)
        out = self.transformer(
            hidden_states=FluxPipeline._pack_latents(x.to(dev, dt), b, c, h, w),
            timestep=t.to(dev, torch.float32).to(dt).expand(b),
            guidance=g,
            pooled_projections=cond["pooled_projections"].to(dev, dt),
            encoder_hidden_states=hidden,
            txt_ids=torch.zeros(hidden.shape[1], 3, device=dev, dtype=dt),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, dev, dt),
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(out, h * f, w * f, f)

    def guided_velocity(self, x: Tensor, t: Tensor, cond: Condition, null: Condition, guidance: float) -> Tensor:
        if self.embedded_guidance:
            return self.velocity(x, t.to(self.device, torch.float32).expand(x.shape[0]), cond, guidance).float()
        return super().guided_velocity(x, t, cond, null, guidance)

    def set_timesteps(self, scheduler, steps: int) -> None:
        """As FluxPipeline: sigmas linspace(1, 1/steps), mu from the packed image length (dynamic shift)."""
        c = scheduler.config
        sigmas = None if c.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        seq = (self.latent_shape[1] // 2) * (self.latent_shape[2] // 2)
        mu = calculate_shift(seq, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        if sigmas is None:
            scheduler.set_timesteps(steps, device=self.device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
