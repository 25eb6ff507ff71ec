"""Model families behind one interface (:class:`~gdro_core.models.base.FlowModel`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from gdro_core.models.base import FlowModel, ModelError, pick_device
from gdro_core.models.builtin import BuiltinModelAdapter, TextRenderPipeline
from gdro_core.models.sd3 import StableDiffusion3Adapter
from gdro_core.params import World


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
