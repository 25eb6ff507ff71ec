"""Rectified-flow text-to-image models behind one small interface.

Training, rollout and evaluation see only :class:`FlowModel`: encode prompts once, predict a
velocity, decode latents. The built-in pixel-space model and real SD3/SD3.5 checkpoints share the
same transformer class (``SD3Transformer2DModel``) and the same scheduler, so they share one code path.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from PIL import Image
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from gdro_core.params import BuiltinModel, World

Condition = dict[str, Tensor]
"""Prompt conditioning, batch-first: ``encoder_hidden_states`` and ``pooled_projections``."""

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


class ModelError(ValueError):
    """A model source that cannot be loaded; the message says what to change."""


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


def build_builtin_pipeline(cfg: BuiltinModel, world: World, shift: float, seed: int) -> TextRenderPipeline:
    """A freshly initialised built-in model sized for the world's images."""
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
        in_channels=1,
        out_channels=1,
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


class FlowModel(Protocol):
    transformer: torch.nn.Module
    scheduler: FlowMatchEulerDiscreteScheduler
    latent_shape: tuple[int, int, int]
    device: torch.device
    dtype: torch.dtype

    def encode(self, prompts: list[str]) -> Condition: ...
    def decode(self, latents: Tensor) -> list[Image.Image]: ...


def velocity(model: FlowModel, x: Tensor, t: Tensor, cond: Condition) -> Tensor:
    """v_θ(x_t, t, c) for t in [0, 1]; SD3 transformers take the timestep scaled to [0, 1000]."""
    return model.transformer(
        hidden_states=x.to(model.dtype),
        encoder_hidden_states=cond["encoder_hidden_states"].to(model.dtype),
        pooled_projections=cond["pooled_projections"].to(model.dtype),
        timestep=(t * 1000).to(model.dtype),
        return_dict=False,
    )[0]


class BuiltinModelAdapter:
    """Pixel-space built-in model: latents are the images in [-1, 1]."""

    def __init__(self, pipe: TextRenderPipeline, world_shape: tuple[int, int]):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.scheduler = pipe.scheduler
        self.latent_shape = (1, *world_shape)
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
        return [Image.fromarray(a[0], mode="L") for a in arr]


class StableDiffusion3Adapter:
    """A real SD3/SD3.5 checkpoint through diffusers' StableDiffusion3Pipeline (VAE latents)."""

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


def pick_device(name: str) -> torch.device:
    """'auto' asks accelerate for the best available device; anything else is taken as given."""
    if name == "auto":
        from accelerate import PartialState

        return PartialState().device
    return torch.device(name)


def load_flow_model(
    source: str, base_dir: str | Path, world: World, device: str = "auto", dtype: str = "float32"
) -> FlowModel:
    """Load the built-in base from ``base_dir`` or a real diffusers checkpoint named by ``source``."""
    torch_dtype = getattr(torch, dtype)
    dev = pick_device(device)
    if source == "builtin":
        base_dir = Path(base_dir)
        if not (base_dir / "model_index.json").is_file():
            raise ModelError(f"no built-in base model at {base_dir}: run `gdro base` (or `dvc repro base`) first")
        pipe = TextRenderPipeline.from_pretrained(base_dir, dtype=torch_dtype).to(dev)
        adapter: FlowModel = BuiltinModelAdapter(pipe, (world.height, world.width))
    else:
        index = Path(source) / "model_index.json"
        if Path(source).exists() and not index.is_file():
            raise ModelError(f"{source} is not a diffusers checkpoint directory (no model_index.json)")
        class_name = json.loads(index.read_text())["_class_name"] if index.is_file() else None
        try:
            pipe = DiffusionPipeline.from_pretrained(source, dtype=torch_dtype)
        except OSError as err:
            raise ModelError(
                f"cannot load checkpoint {source!r}: {err}. Give model.source as a local diffusers directory, "
                "or a hub id already in the local cache"
            ) from None
        class_name = class_name or type(pipe).__name__
        if class_name.startswith("StableDiffusion3"):
            adapter = StableDiffusion3Adapter(pipe.to(dev), world.height, world.width)
        else:
            raise ModelError(f"model family {class_name} is not supported yet; supported: StableDiffusion3Pipeline")
    for module in (adapter.transformer,):
        module.requires_grad_(False)
    return adapter


def images_to_array(images: list[Image.Image]) -> np.ndarray:
    """PIL images to a uint8 array (n, H, W[, C])."""
    return np.stack([np.asarray(im) for im in images])
