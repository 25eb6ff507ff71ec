"""The built-in family: a small pixel-space SD3-class model that the ``base`` stage pretrains here.

It uses the same transformer class (``SD3Transformer2DModel``) and scheduler as real SD3/SD3.5
checkpoints, with a character-level CLIP text encoder built in code, so nothing is downloaded.
"""

from __future__ import annotations

import string

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from PIL import Image
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from gdro_core.models.base import Condition, ModelError
from gdro_core.params import BuiltinModel, World

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def build_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer (no merges) over lower-case ASCII, built in code."""
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=[])


class TextRenderPipeline(DiffusionPipeline):
    """The built-in pixel-space model: SD3 transformer, tiny CLIP text encoder, FlowMatch Euler scheduler."""

    def __init__(self, transformer, scheduler, text_encoder, tokenizer):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)


def build_builtin_pipeline(
    cfg: BuiltinModel, world: World, shift: float, seed: int, channels: int = 1
) -> TextRenderPipeline:
    """A freshly initialised built-in model sized for the world's images (``channels``: 1 grayscale, 3 RGB)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
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
    side = max(world.height, world.width)
    if world.height % cfg.patch_size or world.width % cfg.patch_size:
        raise ModelError(
            f"world size {world.height}x{world.width} is not divisible by model.builtin.patch_size={cfg.patch_size}"
        )
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
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        text_encoder=CLIPTextModelWithProjection(text_config),
        tokenizer=tokenizer,
    )


class BuiltinModelAdapter:
    """Pixel-space built-in model: latents are the images in [-1, 1]."""

    def __init__(self, pipe: TextRenderPipeline, world_shape: tuple[int, int]):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.scheduler = pipe.scheduler
        self.latent_shape = (pipe.transformer.config.in_channels, *world_shape)
        self.device = pipe.transformer.device
        self.dtype = pipe.transformer.dtype

    def encode(self, prompts: list[str]) -> Condition:
        tok = self.pipe.tokenizer(
            prompts, padding="max_length", max_length=self.pipe.text_encoder.config.max_position_embeddings,
            truncation=True, return_tensors="pt",
        )
        out = self.pipe.text_encoder(input_ids=tok.input_ids.to(self.device))
        return {"encoder_hidden_states": out.last_hidden_state, "pooled_projections": out.text_embeds}

    def decode(self, latents: Tensor) -> list[Image.Image]:
        arr = ((latents.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
        if arr.shape[1] == 1:
            return [Image.fromarray(a[0], mode="L") for a in arr]
        return [Image.fromarray(a.transpose(1, 2, 0), mode="RGB") for a in arr]
