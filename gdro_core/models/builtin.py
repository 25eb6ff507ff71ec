"""The built-in family: a small pixel-space SD3-class model that the ``base`` stage pretrains here.

It uses the same transformer class (``SD3Transformer2DModel``) and scheduler as real SD3/SD3.5
checkpoints, with a tiny CLIP text encoder and a tokenizer built in code, so nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from PIL import Image
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from gdro_core.build_lock import building
from gdro_core.models.base import Condition, ModelError
from gdro_core.models.builtin_tokenizer import BOS, EOS, build_tokenizer
from gdro_core.models.family import DiffusersFlowModel
from gdro_core.models.sd3 import SD3_TARGETS, sd3_timesteps, sd3_velocity


def pixel_images(pixels: Tensor) -> list[Image.Image]:
    """The built-in model's latents, (N, C, H, W) pixels in [-1, 1], as images (C 1: grayscale, 3: RGB)."""
    arr = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    if arr.shape[1] == 1:
        return [Image.fromarray(a[0], mode="L") for a in arr]
    return [Image.fromarray(a.transpose(1, 2, 0), mode="RGB") for a in arr]


class TextRenderPipeline(DiffusionPipeline):
    """The built-in pixel-space model: SD3 transformer, tiny CLIP text encoder, FlowMatch Euler scheduler."""

    def __init__(self, transformer, scheduler, text_encoder, tokenizer):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)

    def save_pretrained(self, save_directory, **kwargs):
        """As diffusers saves it, less the fast tokenizer's last-call padding and truncation, which `tokenizers`
        writes into tokenizer.json: the same weights save as the same bytes whether or not this process encoded
        a prompt (a resumed `gdro base` encodes none), so DVC never sees a new base for an unchanged one."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            backend.no_padding()
            backend.no_truncation()
        return super().save_pretrained(save_directory, **kwargs)


def build_builtin_pipeline(
    cfg, image_shape: tuple[int, int, int], shift: float | None, seed: int, words: Sequence[str] = ()
) -> TextRenderPipeline:
    """A freshly initialised built-in model for images of ``image_shape`` (height, width, channels: 1 grayscale,
    3 RGB; ``Params.image_shape``). ``cfg`` is the ``model.builtin`` params section (layers, heads, head_dim,
    patch_size, text_dim, text_layers, max_tokens); ``words`` are read whole by the tokenizer (see
    :func:`gdro_core.tasks.registry.caption_words`; none: character-level)."""
    height, width, channels = image_shape
    with building():  # the global RNG and torch's init functions are the process's: one build at a time
        torch.manual_seed(seed)
        tokenizer = build_tokenizer(words)
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer.get_vocab()),
            hidden_size=cfg.text_dim,
            intermediate_size=cfg.text_dim * 4,
            projection_dim=cfg.text_dim,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=max(1, cfg.text_dim // 32),
            max_position_embeddings=cfg.max_tokens,
            bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
            eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
            pad_token_id=tokenizer.convert_tokens_to_ids(EOS),
        )
        side = max(height, width)
        if height % cfg.patch_size or width % cfg.patch_size:
            raise ModelError(f"world size {height}x{width} is not divisible by model.builtin.patch_size="
                             f"{cfg.patch_size}")
        transformer = SD3Transformer2DModel(
            sample_size=side,
            patch_size=cfg.patch_size,
            in_channels=channels,
            out_channels=channels,
            num_layers=cfg.layers,
            attention_head_dim=cfg.head_dim,
            num_attention_heads=cfg.heads,
            joint_attention_dim=cfg.text_dim,
            caption_projection_dim=cfg.heads * cfg.head_dim,
            pooled_projection_dim=cfg.text_dim,
            pos_embed_max_size=side // cfg.patch_size,
        )
        return TextRenderPipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0 if shift is None else shift),
            text_encoder=CLIPTextModelWithProjection(text_config),
            tokenizer=tokenizer,
        )


class BuiltinModelAdapter(DiffusersFlowModel):
    """Pixel-space built-in model: latents are the images in [-1, 1]; guidance is classifier-free."""

    family = "builtin"
    pipeline_class = StableDiffusion3Pipeline
    transformer_class = SD3Transformer2DModel
    lora_targets = SD3_TARGETS

    def __init__(self, pipe: TextRenderPipeline, world_shape: tuple[int, int], base_dir: Path | None = None,
                 shift: float | None = None, guidance: float | None = None):
        super().__init__(pipe, (pipe.transformer.config.in_channels, *world_shape), "builtin", base_dir,
                         shift, guidance)

    def encode(self, prompts: list[str]) -> Condition:
        """CLIP conditioning; gradients only while the text encoder is being trained (pretraining)."""
        encoder = self.pipe.text_encoder
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in encoder.parameters())
        tok = self.pipe.tokenizer(
            prompts, padding="max_length", max_length=encoder.config.max_position_embeddings,
            truncation=True, return_tensors="pt",
        )
        with torch.set_grad_enabled(trains):
            out = encoder(input_ids=tok.input_ids.to(self.device))
        return {"encoder_hidden_states": out.last_hidden_state, "pooled_projections": out.text_embeds}

    def velocity(self, x: Tensor, t: Tensor, cond: Condition, guidance: float | None = None) -> Tensor:
        return sd3_velocity(self, x, t, cond)

    def set_timesteps(self, scheduler, steps: int) -> None:
        sd3_timesteps(self, scheduler, steps)

    def decode(self, latents: Tensor) -> list[Image.Image]:
        return pixel_images(latents)

    def encode_images(self, images: list[Image.Image]) -> Tensor:
        mode = "L" if self.latent_shape[0] == 1 else "RGB"
        arr = np.stack([np.asarray(im.convert(mode), dtype=np.float32).reshape(*im.size[::-1], -1) for im in images])
        return (torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1).to(self.device)

    def identity(self) -> dict[str, str]:
        if self._identity is None and self.base_dir is None:
            from gdro_core.models.identity import state_fingerprint

            modules = {"transformer": self.transformer, "text_encoder": self.pipe.text_encoder}
            self._identity = {"family": self.family, "source": self.source, "fingerprint": state_fingerprint(modules)}
        return super().identity()
