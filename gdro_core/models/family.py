"""The parts every model family shares; each family module subclasses :class:`DiffusersFlowModel`.

A family owns everything that differs between families: text encoding, the velocity call, the
scheduler's timesteps, how guidance works, VAE encode/decode, the default LoRA targets, the size
multiple and the diffusers LoRA format its adapters are saved in (with their settings as metadata).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image
from torch import Tensor

from gdro_core.models import lora
from gdro_core.models.base import Condition, ModelError

BASE_FILE = "base.json"
"""Written beside a saved adapter: the base (family, source, fingerprint) it was trained on."""


def concat(a: Condition, b: Condition) -> Condition:
    return {k: torch.cat([a[k], b[k]]) for k in a}


def expand(cond: Condition, n: int) -> Condition:
    """Repeat a single-row condition (e.g. the empty prompt) to ``n`` rows."""
    return {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}


class DiffusersFlowModel:
    """A diffusers pipeline behind :class:`~gdro_core.models.base.FlowModel`; everything but the LoRA is frozen."""

    family: ClassVar[str]
    pipeline_class: ClassVar[type]
    """The diffusers pipeline whose ``save_lora_weights`` / ``load_lora_weights`` format adapters use."""
    lora_targets: ClassVar[tuple[str, ...]]
    embedded_guidance: bool = False

    @classmethod
    def default_lora_targets(cls, transformer: torch.nn.Module) -> list[str]:
        """The LoRA target modules (peft suffixes) when ``train.lora.target_modules`` is empty."""
        return list(cls.lora_targets)

    def __init__(self, pipe, latent_shape: tuple[int, int, int], source: str, base_dir: Path | None = None,
                 shift: float | None = None, guidance: float | None = None):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.scheduler = pipe.scheduler
        self.latent_shape = latent_shape
        self.device = pipe.transformer.device
        self.dtype = pipe.transformer.dtype
        self.source = source
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.shift = shift
        self.default_guidance = guidance
        self._identity: dict[str, str] | None = None
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()

    @classmethod
    def from_transformer(cls, transformer: torch.nn.Module, scheduler: FlowMatchEulerDiscreteScheduler, height: int,
                         width: int, *, shift: float | None = None, guidance: float | None = None):
        """The family around a bare transformer and scheduler, with no text encoders and no VAE.

        Everything a training step runs works (the velocity, guidance, sampling schedule, LoRA); conditions are
        given directly instead of encoded (the GPU benchmark builds full-size transformers this way).
        """
        names, _ = cls.pipeline_class._get_signature_keys(cls.pipeline_class)
        parts = dict.fromkeys(names) | {"transformer": transformer, "scheduler": scheduler}
        return cls(cls.pipeline_class(**parts), height, width, shift=shift, guidance=guidance)

    def component(self, name: str):
        """A pipeline component; a clear error when the model was built without it (:meth:`from_transformer`)."""
        part = getattr(self.pipe, name, None)
        if part is None:
            raise ModelError(
                f"this {self.family} model has no {name}: it was built from a transformer alone "
                "(from_transformer); load the whole checkpoint with load_model to encode prompts or decode latents"
            )
        return part

    # --- guidance and timesteps -------------------------------------------------------------------------------
    def guided_velocity(self, x: Tensor, t: Tensor, cond: Condition, null: Condition, guidance: float) -> Tensor:
        """Classifier-free guidance v_u + w (v_c − v_u) for w > 1 (one batched pass), else v_c; float32."""
        n = x.shape[0]
        t = t.to(self.device, torch.float32).expand(n)
        if guidance > 1.0:
            both = concat(cond, expand(null, n))
            v_c, v_u = self.velocity(torch.cat([x, x]), torch.cat([t, t]), both).float().chunk(2)
            return v_u + guidance * (v_c - v_u)
        return self.velocity(x, t, cond).float()

    def scheduler_config(self) -> dict:
        """The checkpoint's scheduler config; ``sampler.shift`` set replaces its shift (and any dynamic shift)."""
        config = dict(self.scheduler.config)
        if self.shift is not None:
            config.update(shift=self.shift, use_dynamic_shifting=False)
        return config

    def sampling_scheduler(self, steps: int) -> FlowMatchEulerDiscreteScheduler:
        """A fresh scheduler with the ``steps`` timesteps this family's own pipeline would use."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config())
        self.set_timesteps(scheduler, steps)
        return scheduler

    def set_timesteps(self, scheduler: FlowMatchEulerDiscreteScheduler, steps: int) -> None:
        scheduler.set_timesteps(steps, device=self.device)

    # --- VAE ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: Tensor) -> list[Image.Image]:
        """Latents (B, C, H, W) to images, undoing the VAE's scaling and shift."""
        vae = self.component("vae")
        device = next(vae.parameters()).device  # the VAE may be offloaded while the transformer trains
        x = latents.to(device, vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return self.pipe.image_processor.postprocess(vae.decode(x, return_dict=False)[0], output_type="pil")

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> Tensor:
        """Images to latents (the posterior mean), with the VAE's shift and scaling applied."""
        vae = self.component("vae")
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]  # the VAE reads three channels
        x = self.pipe.image_processor.preprocess(rgb).to(next(vae.parameters()).device, vae.dtype)
        z = vae.encode(x).latent_dist.mode()
        return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    # --- base identity and adapters ---------------------------------------------------------------------------
    def identity(self) -> dict[str, str]:
        """``family``, ``source`` and ``fingerprint`` (content hash of the weights, or the hub revision)."""
        if self._identity is None:
            from gdro_core.models.identity import base_fingerprint

            self._identity = {"family": self.family, "source": self.source,
                              "fingerprint": base_fingerprint(self.source, self.base_dir)}
        return self._identity

    def save_adapter(self, out_dir: Path) -> Path:
        """The adapter in this family's diffusers LoRA format, its settings as metadata, and ``base.json``."""
        from gdro_core.data.store import write_json

        path = lora.save_lora(self.transformer, Path(out_dir), self.pipeline_class)
        write_json(Path(out_dir) / BASE_FILE, self.identity())
        return path

    def load_adapter(self, path: Path) -> None:
        """Attach a saved adapter; refuse one trained on another base (family or fingerprint)."""
        from gdro_core.data.store import read_json

        base_file = Path(path) / BASE_FILE
        if base_file.is_file():
            trained_on, here = read_json(base_file), self.identity()
            for key in ("family", "fingerprint"):
                if trained_on.get(key) != here[key]:
                    raise ModelError(
                        f"the adapter at {path} was trained on {trained_on.get('family')} base "
                        f"{trained_on.get('source')!r} ({key} {trained_on.get(key)}), but this model is "
                        f"{here['family']} {here['source']!r} ({key} {here[key]}): load it onto the base it was "
                        "trained on, or train a new adapter for this base"
                    )
        lora.load_lora(self.transformer, Path(path))
