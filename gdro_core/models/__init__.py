"""Model families behind one interface (:class:`~gdro_core.models.base.FlowModel`).

:func:`load_model` is the one way a stage builds its model from params; the families themselves take
plain values (image size, channels, the ``model.builtin`` section as an object), never a params type. Importing
the package loads neither torch nor diffusers (``gdro check`` never loads a model); loading a model does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gdro_core.models.checkpoint_files import ModelError, check_image_size  # noqa: F401 - torch-free, re-exported

if TYPE_CHECKING:
    from gdro_core.models.base import FlowModel


def load_model(params, base_dir: str | Path, device: str | None = None) -> FlowModel:
    """The model ``params`` describe: the built-in base saved in ``base_dir`` or the real checkpoint
    ``model.source``, for the task's images (``params.image_shape``), on ``model.device`` (or ``device``) in
    ``model.dtype``, with ``sampler.shift`` and ``sampler.guidance``."""
    m, s = params.model, params.sampler
    height, width, _ = params.image_shape
    return _load_family_model(m.source, base_dir, (height, width), device or m.device, m.dtype, s.shift, s.guidance)


def _load_family_model(
    source: str, base_dir: str | Path, size: tuple[int, int], device: str = "auto", dtype: str = "float32",
    shift: float | None = None, guidance: float | None = None,
) -> FlowModel:
    """Load the built-in base from ``base_dir`` or a real diffusers checkpoint named by ``source``.

    ``shift`` (``sampler.shift``) replaces the checkpoint's timestep shift when set; ``guidance`` is the
    embedded guidance scale a guidance-distilled checkpoint (FLUX.1-dev) is trained at (``sampler.guidance``).
    """
    import torch

    from gdro_core.build_lock import building
    from gdro_core.models.base import pick_device
    from gdro_core.models.builtin import BuiltinModelAdapter, TextRenderPipeline
    from gdro_core.models.checkpoint_files import check_size, read_model_index
    from gdro_core.models.families import family_for_class

    height, width = size
    torch_dtype = getattr(torch, dtype)
    dev = pick_device(device)
    if source == "builtin":
        base_dir = Path(base_dir)
        if not (base_dir / "model_index.json").is_file():
            raise ModelError(f"no built-in base model at {base_dir}: run `gdro base` (or `dvc repro base`) first")
        with building():
            pipe = TextRenderPipeline.from_pretrained(base_dir, dtype=torch_dtype).to(dev)
            return BuiltinModelAdapter(pipe, (height, width), base_dir, shift, guidance)
    if Path(source).exists() and not (Path(source) / "model_index.json").is_file():
        raise ModelError(f"{source} is not a diffusers checkpoint directory (no model_index.json)")
    index = read_model_index(source)
    if index is None:
        raise ModelError(f"cannot find checkpoint {source!r}: give model.source as a local diffusers directory, "
                         "or a hub id already in the local cache")
    family = family_for_class(index.get("_class_name", ""))
    check_size(source, height, width)
    with building():
        try:
            pipe = family.pipeline_class.from_pretrained(source, dtype=torch_dtype)
        except OSError as err:
            raise ModelError(
                f"cannot load checkpoint {source!r}: {err}. Give model.source as a local diffusers directory, "
                "or a hub id already in the local cache"
            ) from None
        return family(pipe.to(dev), height, width, source, shift=shift, guidance=guidance)
