"""The model-family registry: which family a checkpoint or transformer belongs to, the sizes it takes and the
LoRA adapter it takes by default (its target modules, its save format).

A checkpoint's family is its ``model_index.json`` ``_class_name``; everything else is the family's
(see :mod:`gdro_core.models.family`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from gdro_core.models.base import ModelError
from gdro_core.models.builtin import BuiltinModelAdapter
from gdro_core.models.checkpoint_files import SUPPORTED, read_model_index, unsupported
from gdro_core.models.flux import FluxModel
from gdro_core.models.lora import attach_lora, save_lora
from gdro_core.models.sd3 import StableDiffusion3Model

FAMILIES: dict[str, type] = {
    "StableDiffusion3Pipeline": StableDiffusion3Model,
    "FluxPipeline": FluxModel,
}
"""Real checkpoints by their pipeline class (``model_index.json``); the built-in model is ``model.source: builtin``."""

def family_for_class(class_name: str) -> type:
    """The family of a checkpoint's pipeline class; an unsupported one is an error naming the supported ones."""
    if class_name not in FAMILIES:
        raise unsupported(class_name)
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
