"""LoRA adapters on the transformer through peft; the reference model is the adapter disabled.

Adapters are saved in the family's own diffusers LoRA format (keys prefixed ``transformer.``), with
the adapter's settings (rank, alpha, target modules) as diffusers' LoRA adapter metadata, so
``pipe.load_lora_weights(dir)`` and :func:`load_lora` rebuild exactly the adapter that was trained.
This module knows no family: the family's default targets and save format are applied by
:func:`gdro_core.models.families.add_lora` and :func:`~gdro_core.models.families.save_adapter`.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from gdro_core.build_lock import building
from gdro_core.data.store import canonical_safetensors

ADAPTER = "gdro"
WEIGHTS = "pytorch_lora_weights.safetensors"
PREFIX = "transformer"


def attach_lora(transformer: torch.nn.Module, cfg, targets: list[str]) -> list[torch.nn.Parameter]:
    """Attach a fresh adapter on the modules ``targets`` names (B = 0, so the policy starts equal to the reference);
    return its parameters. ``cfg`` is the ``train.lora`` params section (rank, alpha, dropout). The family's
    default targets are :func:`gdro_core.models.families.add_lora`'s."""
    missing = [m for m in targets if not any(n.endswith(m) for n, _ in transformer.named_modules())]
    if missing:
        raise ValueError(f"train.lora.target_modules {missing} match no module of the transformer")
    transformer.requires_grad_(False)
    with building():
        transformer.add_adapter(
            LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                       init_lora_weights=True),
            adapter_name=ADAPTER,
        )
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
        p.data = p.data.float()
    return params


@contextmanager
def reference(transformer: torch.nn.Module):
    """The frozen base: the same network with its adapter switched off."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def lora_state(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return get_peft_model_state_dict(transformer, adapter_name=ADAPTER)


def set_lora_state(transformer: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(transformer, state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"adapter weights do not fit this transformer: unexpected keys {unexpected[:3]}...")


def adapter_metadata(transformer: torch.nn.Module) -> dict:
    """The adapter's LoraConfig as diffusers' ``transformer_lora_adapter_metadata`` (rank, alpha, targets...)."""
    config = transformer.peft_config[ADAPTER].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}  # sets list in hash order


def save_lora(transformer: torch.nn.Module, out_dir: Path, pipeline_class: type) -> Path:
    """``pipeline_class.save_lora_weights`` with the adapter settings as metadata; returns the weights file."""
    pipeline_class.save_lora_weights(
        out_dir, transformer_lora_layers=lora_state(transformer), weight_name=WEIGHTS, safe_serialization=True,
        transformer_lora_adapter_metadata=adapter_metadata(transformer),
    )
    return canonical_safetensors(Path(out_dir) / WEIGHTS)  # same weights, same bytes, in any process


def load_lora(transformer: torch.nn.Module, path: Path) -> None:
    """Attach a saved adapter under the training adapter's name, with the rank/alpha/targets saved beside it.

    Every saved key must fit a module of this transformer and every adapted module must be in the file:
    an adapter trained for another architecture is an error, not a warning.
    """
    from safetensors import safe_open

    path = Path(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"no adapter weights at {weights}: run `gdro train` first")
    with safe_open(str(weights), "pt") as f:
        saved = {k.removeprefix(f"{PREFIX}.") for k in f.keys() if k.startswith(f"{PREFIX}.")}
        has_metadata = "lora_adapter_metadata" in (f.metadata() or {})
    if not has_metadata:
        raise ValueError(f"{weights} has no LoRA adapter metadata (rank, alpha, targets): it was saved by an older "
                         "version; retrain it (`gdro train`) so that it loads as it was trained")
    with building():
        if ADAPTER in getattr(transformer, "peft_config", {}):
            transformer.delete_adapters(ADAPTER)
        transformer.load_lora_adapter(str(path), prefix=PREFIX, weight_name=WEIGHTS, adapter_name=ADAPTER)
    if ADAPTER not in getattr(transformer, "peft_config", {}):
        raise ValueError(f"{weights} holds no LoRA weights for this transformer")
    loaded = set(lora_state(transformer))
    if saved != loaded:
        transformer.delete_adapters(ADAPTER)
        extra, missing = sorted(saved - loaded), sorted(loaded - saved)
        raise ValueError(f"the adapter at {weights} does not fit this transformer (unexpected keys {extra[:3]}, "
                         f"missing keys {missing[:3]}): it was trained for another base model")


def load_adapter(transformer: torch.nn.Module, path: Path) -> None:
    """Alias of :func:`load_lora` (the transformer-level loader; models load theirs with ``model.load_adapter``)."""
    load_lora(transformer, path)


INIT_SETTINGS = ("r", "lora_alpha", "target_modules")
"""Adapter settings a saved adapter must share with the one it initialises (its weights mean nothing otherwise)."""


def init_lora_from(transformer: torch.nn.Module, path: Path) -> None:
    """Set the training adapter's weights to the adapter saved in ``path`` (a later round starts where the
    previous one ended). Its rank, alpha, targets and keys must be the training adapter's: a mismatch is an error."""
    import json

    from safetensors import safe_open

    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"no adapter weights at {weights} to start training from: train that round first")
    with safe_open(str(weights), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
        state = {k.removeprefix(f"{PREFIX}."): f.get_tensor(k) for k in f.keys() if k.startswith(f"{PREFIX}.")}
    ours = adapter_metadata(transformer)
    saved = {k: meta.get(f"{PREFIX}.{k}") for k in INIT_SETTINGS}
    wanted = {k: sorted(v) if k == "target_modules" else v for k, v in ((k, ours.get(k)) for k in INIT_SETTINGS)}
    if {k: sorted(v) if isinstance(v, list) else v for k, v in saved.items()} != wanted:
        raise ValueError(
            f"the adapter at {weights} has LoRA settings {saved} but train.lora gives {wanted}: a later round trains "
            "the same LoRA further, so set train.lora as that adapter was trained"
        )
    if set(state) != set(lora_state(transformer)):
        raise ValueError(
            f"the adapter at {weights} does not fit this transformer: it was trained for another base model"
        )
    set_lora_state(transformer, {k: v.float() for k, v in state.items()})
