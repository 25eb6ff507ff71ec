"""The SD3 / SD3.5 family: real checkpoints through diffusers' StableDiffusion3Pipeline (VAE latents)."""

from __future__ import annotations

from PIL import Image
from torch import Tensor

from gdro_core.models.base import Condition


class StableDiffusion3Adapter:
    """A real SD3/SD3.5 checkpoint: CLIP-L, CLIP-G and T5 conditioning, 16-channel VAE latents."""

    def __init__(self, pipe, height: int, width: int):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.scheduler = pipe.scheduler
        f = pipe.vae_scale_factor
        self.latent_shape = (pipe.transformer.config.in_channels, height // f, width // f)
        self.device = pipe.transformer.device
        self.dtype = pipe.transformer.dtype

    def encode(self, prompts: list[str]) -> Condition:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def decode(self, latents: Tensor) -> list[Image.Image]:
        vae = self.pipe.vae
        x = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return self.pipe.image_processor.postprocess(vae.decode(x, return_dict=False)[0], output_type="pil")
