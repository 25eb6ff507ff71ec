"""The model-family registry: which family a checkpoint or transformer belongs to, the sizes it takes and the
LoRA adapter it takes by default (its target modules, its save format).

A checkpoint's family is its ``model_index.json`` ``_class_name``; everything else is the family's
(see :mod:`gdro_core.models.family`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gdro_core.models.base import ModelError
from gdro_core.models.builtin import BuiltinModelAdapter
from gdro_core.models.flux import FluxModel
from gdro_core.models.lora import attach_lora, save_lora
from gdro_core.models.sd3 import StableDiffusion3Model

FAMILIES: dict[str, type] = {
    "StableDiffusion3Pipeline": StableDiffusion3Model,
    "FluxPipeline": FluxModel,
}
"""Real checkpoints by their pipeline class (``model_index.json``); the built-in model is ``model.source: builtin``."""

SUPPORTED = "builtin, StableDiffusion3Pipeline (SD3 / SD3.5), FluxPipeline (FLUX.1-dev / FLUX.1-schnell)"


def _cached_file(source: str, name: str) -> Path | None:
    """``source/name`` for a local directory, else the file from a hub id's local cache (nothing is downloaded)."""
    if Path(source).is_dir():
        path = Path(source) / name
        return path if path.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source, name)
    except Exception:  # noqa: BLE001 - not a valid hub id: not cached
        return None
    return Path(found) if isinstance(found, str) else None


def read_model_index(source: str) -> dict | None:
    """The checkpoint's ``model_index.json`` (``None`` when it cannot be found locally)."""
    path = _cached_file(source, "model_index.json")
    return json.loads(path.read_text()) if path else None


def family_for_class(class_name: str) -> type:
    """The family of a checkpoint's pipeline class; an unsupported one is an error naming the supported ones."""
    if class_name not in FAMILIES:
        raise ModelError(f"model family {class_name} is not supported; supported: {SUPPORTED}")
    return FAMILIES[class_name]


def family_for_transformer(transformer: torch.nn.Module) -> type:
    """The family whose transformer class this is (the built-in model shares SD3's transformer and LoRA format)."""
    for family in FAMILIES.values():
        if isinstance(transformer, family.transformer_class):
            return family
    raise ModelError(f"no model family has a {type(transformer).__name__} transformer; supported: {SUPPORTED}")


def default_targets(transformer: torch.nn.Module) -> list[str]:
    """The family's default LoRA target modules for this transformer."""
    return family_for_transformer(transformer).default_lora_targets(transformer)


def add_lora(transformer: torch.nn.Module, cfg) -> list[torch.nn.Parameter]:
    """Attach a fresh adapter (B = 0, so the policy starts equal to the reference); return its parameters.

    ``cfg`` is the ``train.lora`` params section (rank, alpha, dropout, target_modules); an empty
    ``cfg.target_modules`` means the family's default targets.
    """
    return attach_lora(transformer, cfg, list(cfg.target_modules) or default_targets(transformer))


def save_adapter(transformer: torch.nn.Module, out_dir: Path) -> Path:
    """:func:`~gdro_core.models.lora.save_lora` in the format of the transformer's family."""
    return save_lora(transformer, out_dir, family_for_transformer(transformer).pipeline_class)


def size_multiple(source: str, builtin=None) -> tuple[int, str] | None:
    """The multiple image sides must be for ``source`` and why (``None`` when the checkpoint is not found locally)."""
    if source == "builtin":
        return BuiltinModelAdapter.size_multiple(builtin)
    index = read_model_index(source)
    if index is None:
        return None
    family = family_for_class(index.get("_class_name", ""))
    configs = [_cached_file(source, f"{part}/config.json") for part in ("vae", "transformer")]
    if not all(configs):
        return None
    vae, transformer = (json.loads(c.read_text()) for c in configs)
    return family.size_multiple(vae, transformer)


def check_size(source: str, height: int, width: int, builtin=None) -> None:
    """Raise naming the multiple when the family cannot take an image of ``height`` x ``width``."""
    found = size_multiple(source, builtin)
    if found is None:
        return
    m, why = found
    if height % m or width % m:
        fit = lambda v: max(m, round(v / m) * m)  # noqa: E731
        raise ModelError(
            f"world size {height}x{width} does not fit model.source {source!r}: image height and width must be "
            f"multiples of {m} ({why}); e.g. world.height: {fit(height)}, world.width: {fit(width)}"
        )


def base_identity(source: str, base_dir: Path | None = None) -> dict[str, str]:
    """``family``, ``source`` and ``fingerprint`` of a base without loading it (what ``gdro base`` records)."""
    from gdro_core.models.identity import base_fingerprint

    if source == "builtin":
        family = BuiltinModelAdapter.family
    else:
        index = read_model_index(source)
        if index is None:
            raise ModelError(f"cannot find checkpoint {source!r}: give model.source as a local diffusers directory, "
                             "or a hub id already in the local cache")
        family = family_for_class(index.get("_class_name", "")).family
    return {"family": family, "source": source, "fingerprint": base_fingerprint(source, base_dir)}
