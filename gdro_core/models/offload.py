"""Keep only the transformer on the accelerator while training offline.

Offline training reads its conditioning from the rollouts, so the text encoders and the VAE serve only the
checkpoint evaluation: :class:`PreEncoded` encodes its prompts once beforehand, :func:`offload_unused` then
moves the encoders and the VAE off the GPU, and decoding runs wherever the VAE is. Family-agnostic: it
looks for the diffusers pipeline's ``text_encoder*`` and ``vae`` components on ``model.pipe``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor

from gdro_core.models.base import Condition, FlowModel

OFFLOADABLE = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")


def offload_unused(model: FlowModel, device: str | torch.device = "cpu") -> list[str]:
    """Move the pipeline's text encoders and VAE to ``device``; return the names of those moved."""
    pipe = getattr(model, "pipe", None)
    moved = []
    for name in OFFLOADABLE:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            module.to(device)
            moved.append(name)
    if moved and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return moved


class PreEncoded:
    """A view of ``model`` whose ``encode`` answers from prompts encoded up front (plus ""), and whose ``decode``
    runs on the VAE's device; everything else is the model's own."""

    def __init__(self, model: FlowModel, prompts: Sequence[str], batch_size: int = 64):
        self.model = model
        texts = list(dict.fromkeys(["", *prompts]))
        parts: list[Condition] = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                parts.append(model.encode(texts[start : start + batch_size]))
        self.cond = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        self.index = {t: i for i, t in enumerate(texts)}

    def encode(self, prompts: list[str]) -> Condition:
        missing = [p for p in prompts if p not in self.index]
        if missing:
            raise ValueError(f"prompts {missing[:3]} were not encoded before the text encoders were offloaded")
        rows = torch.tensor([self.index[p] for p in prompts])
        return {k: v[rows.to(v.device)] for k, v in self.cond.items()}

    def decode(self, latents: Tensor) -> list[Image.Image]:
        vae = getattr(getattr(self.model, "pipe", None), "vae", None)
        if isinstance(vae, torch.nn.Module):
            latents = latents.to(next(vae.parameters()).device)
        return self.model.decode(latents)

    def __getattr__(self, name: str):
        return getattr(self.model, name)
