"""Model families behind one interface (:class:`~gdro_core.models.base.FlowModel`)."""

from __future__ import annotations

from pathlib import Path

import torch

from gdro_core.models.base import FlowModel, ModelError, pick_device
from gdro_core.params import World


def load_flow_model(
    source: str, base_dir: str | Path, world: World, device: str = "auto", dtype: str = "float32",
    shift: float | None = None, guidance: float | None = None,
) -> FlowModel:
    """Load the built-in base from ``base_dir`` or a real diffusers checkpoint named by ``source``.

    ``shift`` (``sampler.shift``) replaces the checkpoint's timestep shift when set; ``guidance`` is the
    embedded guidance scale a guidance-distilled checkpoint (FLUX.1-dev) is trained at (``sampler.guidance``).
    """
    from gdro_core.models.builtin import BuiltinModelAdapter, TextRenderPipeline
    from gdro_core.models.families import check_size, family_for_class, read_model_index

    torch_dtype = getattr(torch, dtype)
    dev = pick_device(device)
    if source == "builtin":
        base_dir = Path(base_dir)
        if not (base_dir / "model_index.json").is_file():
            raise ModelError(f"no built-in base model at {base_dir}: run `gdro base` (or `dvc repro base`) first")
        pipe = TextRenderPipeline.from_pretrained(base_dir, dtype=torch_dtype).to(dev)
        return BuiltinModelAdapter(pipe, (world.height, world.width), base_dir, shift, guidance)
    if Path(source).exists() and not (Path(source) / "model_index.json").is_file():
        raise ModelError(f"{source} is not a diffusers checkpoint directory (no model_index.json)")
    index = read_model_index(source)
    if index is None:
        raise ModelError(f"cannot find checkpoint {source!r}: give model.source as a local diffusers directory, "
                         "or a hub id already in the local cache")
    family = family_for_class(index.get("_class_name", ""))
    check_size(source, world.height, world.width)
    try:
        pipe = family.pipeline_class.from_pretrained(source, dtype=torch_dtype)
    except OSError as err:
        raise ModelError(
            f"cannot load checkpoint {source!r}: {err}. Give model.source as a local diffusers directory, "
            "or a hub id already in the local cache"
        ) from None
    return family(pipe.to(dev), world.height, world.width, source, shift=shift, guidance=guidance)
