"""What every model family exposes to rollout, training and evaluation.

Training, rollout and evaluation see only :class:`FlowModel`: encode prompts once, predict a
velocity, decode latents. Each family (``builtin``, ``sd3``, ...) implements it in its own module.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image
from torch import Tensor

Condition = dict[str, Tensor]
"""Prompt conditioning, batch-first: ``encoder_hidden_states`` and ``pooled_projections``."""


class ModelError(ValueError):
    """A model source that cannot be loaded; the message says what to change."""


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


def pick_device(name: str) -> torch.device:
    """'auto' asks accelerate for the best available device; anything else is taken as given."""
    if name == "auto":
        from accelerate import PartialState

        return PartialState().device
    return torch.device(name)


def images_to_array(images: list[Image.Image]) -> np.ndarray:
    """PIL images to a uint8 array (n, H, W[, C])."""
    return np.stack([np.asarray(im) for im in images])
