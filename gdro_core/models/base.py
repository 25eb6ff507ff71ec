"""What every model family exposes to rollout, training and evaluation.

Training, rollout and evaluation see only :class:`FlowModel`: encode prompts once, predict a
velocity, decode latents. Each family (``builtin``, ``sd3``, ``flux``) implements it in its own module
(the shared parts live in :mod:`gdro_core.models.family`); nothing outside ``gdro_core.models``
branches on the family.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image
from torch import Tensor

from gdro_core.models.checkpoint_files import ModelError  # noqa: F401 - re-exported

Condition = dict[str, Tensor]
"""Prompt conditioning, batch-first: ``encoder_hidden_states`` and ``pooled_projections``."""


class FlowModel(Protocol):
    family: str
    transformer: torch.nn.Module
    scheduler: FlowMatchEulerDiscreteScheduler
    latent_shape: tuple[int, int, int]
    device: torch.device
    dtype: torch.dtype

    def encode(self, prompts: list[str]) -> Condition: ...
    def decode(self, latents: Tensor) -> list[Image.Image]: ...
    def velocity(self, x: Tensor, t: Tensor, cond: Condition, guidance: float | None = None) -> Tensor: ...
    def guided_velocity(self, x: Tensor, t: Tensor, cond: Condition, null: Condition, guidance: float) -> Tensor: ...
    def sampling_scheduler(self, steps: int) -> FlowMatchEulerDiscreteScheduler: ...
    def save_adapter(self, out_dir: Path) -> Path: ...
    def load_adapter(self, path: Path) -> None: ...
    def identity(self) -> dict[str, str]: ...


def velocity(model: FlowModel, x: Tensor, t: Tensor, cond: Condition) -> Tensor:
    """v_θ(x_t, t, c) for t in [0, 1] on latents in the family's natural (B, C, H, W) form."""
    return model.velocity(x, t, cond)


def guided_velocity(
    model: FlowModel, x: Tensor, t: Tensor, cond: Condition, null: Condition, guidance: float
) -> Tensor:
    """The velocity the sampler follows at scale ``guidance`` (CFG or embedded, as the family does); float32."""
    return model.guided_velocity(x, t, cond, null, guidance)


def with_transformer(model: FlowModel, transformer: torch.nn.Module) -> FlowModel:
    """A shallow view of ``model`` whose velocity runs through ``transformer`` (e.g. a DDP wrapper of its own)."""
    view = copy.copy(model)
    view.transformer = transformer
    return view


def pick_device(name: str) -> torch.device:
    """'auto': this process's accelerator as accelerate assigns it (the local rank's GPU under torchrun), else the
    CPU; anything else is taken as given.

    Without an accelerator, accelerate's process-wide state is not created here: made before the trainer asks for
    its process group, it would fix every rank of a CPU `torchrun` to "not distributed", and each would train
    alone."""
    if name == "auto":
        if not (torch.cuda.is_available() or torch.backends.mps.is_available()):
            return torch.device("cpu")
        from accelerate import PartialState

        return PartialState().device
    return torch.device(name)


def images_to_array(images: list[Image.Image]) -> np.ndarray:
    """PIL images to a uint8 array (n, H, W[, C])."""
    return np.stack([np.asarray(im) for im in images])
