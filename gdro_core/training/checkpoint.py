"""Whole-state training checkpoints, written atomically, loaded without unpickling code."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def rng_state(generator: torch.Generator, py_rng: random.Random) -> dict[str, Any]:
    return {"torch_global": torch.get_rng_state(), "generator": generator.get_state(), "python": py_rng.getstate()}


def restore_rng(state: dict[str, Any], generator: torch.Generator, py_rng: random.Random) -> None:
    torch.set_rng_state(state["torch_global"])
    generator.set_state(state["generator"])
    version, internal, gauss = state["python"]
    py_rng.setstate((version, tuple(internal), gauss))


def save_checkpoint(root: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``step-N/`` (weights as safetensors, the rest as a tensors-only torch file) via a temp dir + rename."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".tmp-{PREFIX}{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / "weights.safetensors")
    torch.save({**state, "step": step}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    found = sorted(p for p in root.glob(f"{PREFIX}*") if (p / "state.pt").is_file()) if root.is_dir() else []
    return found[-1] if found else None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and state of a checkpoint; ``weights_only`` refuses anything but tensors and primitives."""
    return load_file(path / "weights.safetensors"), torch.load(path / "state.pt", weights_only=True)
