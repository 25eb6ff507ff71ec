"""What a checkpoint says about itself, read without loading it or importing torch: its ``model_index.json``, its
components' configs and the image sizes its family takes.

``gdro check``, the first DVC stage, reruns on every params change and validates sizes and paths with these alone,
so it starts in about a second instead of paying for torch and diffusers. Loading a model checks sizes here too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


class ModelError(ValueError):
    """A model source that cannot be loaded; the message says what to change."""


SUPPORTED = "builtin, StableDiffusion3Pipeline (SD3 / SD3.5), FluxPipeline (FLUX.1-dev / FLUX.1-schnell)"


def cached_file(source: str, name: str) -> Path | None:
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
    path = cached_file(source, "model_index.json")
    return json.loads(path.read_text()) if path else None


def vae_factor(vae_config: dict) -> int:
    """The VAE's spatial downsampling: one halving per block after the first."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def builtin_size_multiple(cfg) -> tuple[int, str]:
    """The built-in model (pixel-space patches); ``cfg``: the ``model.builtin`` params section."""
    return cfg.patch_size, f"model.builtin.patch_size={cfg.patch_size}"


def sd3_size_multiple(vae_config: dict, transformer_config: dict) -> tuple[int, str]:
    """SD3 / SD3.5: the VAE factor times the transformer's patch size."""
    f, p = vae_factor(vae_config), transformer_config.get("patch_size", 2)
    return f * p, f"{f}x VAE x patch {p}"


def flux_size_multiple(vae_config: dict, transformer_config: dict) -> tuple[int, str]:
    """FLUX.1: the VAE factor times the 2x2 packing of latents into tokens."""
    f = vae_factor(vae_config)
    return 2 * f, f"{f}x VAE x 2x2 latent packing"


SIZE_RULES: dict[str, Callable[[dict, dict], tuple[int, str]]] = {
    "StableDiffusion3Pipeline": sd3_size_multiple,
    "FluxPipeline": flux_size_multiple,
}
"""Each real family's size rule by its pipeline class (the families' registry, ``families.FAMILIES``, has the same
keys: tests check it)."""


def unsupported(class_name: str) -> ModelError:
    return ModelError(f"model family {class_name} is not supported; supported: {SUPPORTED}")


def size_multiple(source: str, builtin=None) -> tuple[int, str] | None:
    """The multiple image sides must be for ``source`` and why (``None`` when the checkpoint is not found locally)."""
    if source == "builtin":
        return builtin_size_multiple(builtin)
    index = read_model_index(source)
    if index is None:
        return None
    name = index.get("_class_name", "")
    if name not in SIZE_RULES:
        raise unsupported(name)
    configs = [cached_file(source, f"{part}/config.json") for part in ("vae", "transformer")]
    if not all(configs):
        return None
    vae, transformer = (json.loads(c.read_text()) for c in configs)
    return SIZE_RULES[name](vae, transformer)


def check_size(source: str, height: int, width: int, builtin=None) -> None:
    """Raise naming the multiple when the family cannot take an image of ``height`` x ``width``."""
    found = size_multiple(source, builtin)
    if found is None:
        return
    m, why = found
    if height % m or width % m:
        fit = lambda v: max(m, round(v / m) * m)
        raise ModelError(
            f"world size {height}x{width} does not fit model.source {source!r}: image height and width must be "
            f"multiples of {m} ({why}); e.g. world.height: {fit(height)}, world.width: {fit(width)}"
        )


def check_image_size(params) -> None:
    """Raise :class:`ModelError` (a ``ValueError``) naming the multiple when the model family of ``model.source``
    cannot take the task's images (patch size, VAE factor x patch); a checkpoint not found locally is not checked."""
    height, width, _ = params.image_shape
    check_size(params.model.source, height, width, params.model.builtin)
