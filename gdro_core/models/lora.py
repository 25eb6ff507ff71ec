"""LoRA adapters on the transformer through peft; the reference model is the adapter disabled."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from gdro_core.params import Lora

ADAPTER = "gdro"


def add_lora(transformer: torch.nn.Module, cfg: Lora) -> list[torch.nn.Parameter]:
    """Attach a fresh adapter (B = 0, so the policy starts equal to the reference); return its parameters."""
    missing = [m for m in cfg.target_modules if not any(n.endswith(m) for n, _ in transformer.named_modules())]
    if missing:
        raise ValueError(f"train.lora.target_modules {missing} match no module of the transformer")
    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
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


WEIGHTS = "pytorch_lora_weights.safetensors"


def save_adapter(transformer: torch.nn.Module, out_dir: Path) -> Path:
    """Diffusers' SD3 LoRA format (keys prefixed ``transformer.``): ``pipe.load_lora_weights(dir)`` loads it."""
    StableDiffusion3Pipeline.save_lora_weights(
        out_dir, transformer_lora_layers=lora_state(transformer), weight_name=WEIGHTS, safe_serialization=True
    )
    return Path(out_dir) / WEIGHTS


def load_adapter(transformer: torch.nn.Module, path: Path) -> None:
    """Attach a saved adapter to ``transformer`` under the training adapter's name."""
    path = Path(path)
    if not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"no adapter weights at {path / WEIGHTS}: run `gdro train` first")
    transformer.load_lora_adapter(str(path), prefix="transformer", weight_name=WEIGHTS, adapter_name=ADAPTER)
    if ADAPTER not in getattr(transformer, "peft_config", {}):
        raise ValueError(f"{path / WEIGHTS} holds no LoRA weights for this transformer")
