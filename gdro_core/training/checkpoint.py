"""Whole-state training checkpoints, written atomically, loaded without unpickling code."""

from __future__ import annotations

import os
import pickle
import random
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gdro_core.data.store import explain_full_disk

PREFIX = "step-"
UNREADABLE = (SafetensorError, RuntimeError, EOFError, OSError, pickle.UnpicklingError, KeyError, ValueError)
"""What a truncated or half-written checkpoint raises on load."""

DeviceMap = torch.device | str | Mapping[str, torch.device] | Callable[[str], torch.device]


def rng_state(generator: torch.Generator, py_rng: random.Random) -> dict[str, Any]:
    """The training loop's own generators; the global RNG is never used, so it is not saved."""
    return {"generator": generator.get_state(), "python": py_rng.getstate()}


def restore_rng(state: dict[str, Any], generator: torch.Generator, py_rng: random.Random) -> None:
    generator.set_state(state["generator"])
    version, internal, gauss = state["python"]
    py_rng.setstate((version, tuple(internal), gauss))


def to_devices(tensors: Mapping[str, torch.Tensor], devices: DeviceMap) -> dict[str, torch.Tensor]:
    """Each tensor moved to its device: one device for all, a key -> device mapping, or a function of the key.

    Restored state must sit where the module it belongs to lives (an EMA shadow on the CPU beside
    LoRA weights on the GPU fails at the first update).
    """
    if isinstance(devices, (torch.device, str)):
        return {k: v.to(devices) for k, v in tensors.items()}
    if isinstance(devices, Mapping):
        missing = [k for k in tensors if k not in devices]
        if missing:
            raise KeyError(f"no device given for checkpoint tensors {missing[:3]}")
        return {k: v.to(devices[k]) for k, v in tensors.items()}
    return {k: v.to(devices(k)) for k, v in tensors.items()}


def save_checkpoint(root: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``step-N/`` (weights as safetensors, the rest as a tensors-only torch file) via a temp dir + rename."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".tmp-{PREFIX}{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with explain_full_disk(final):
            save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / "weights.safetensors")
            torch.save({**state, "step": step}, tmp / "state.pt")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    return sorted(p for p in root.glob(f"{PREFIX}*") if (p / "state.pt").is_file()) if root.is_dir() else []


def latest_checkpoint(root: Path) -> Path | None:
    found = checkpoints(root)
    return found[-1] if found else None


def resuming_from(root: Path) -> str | None:
    """What a stage says before it continues an interrupted run from ``root`` (None: it starts afresh)."""
    found = latest_checkpoint(root)
    return None if found is None else (f"resuming from {found.name}: an interrupted run with these params, data and "
                                       f"code left it in {root}")


def load_checkpoint(path: Path, map_location: DeviceMap = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and state of a checkpoint; ``weights_only`` refuses anything but tensors and primitives.

    ``map_location`` places the weights (see :func:`to_devices`); the state is read onto the CPU, since the
    optimiser moves its own state to its parameters' devices on ``load_state_dict``.
    """
    weights = to_devices(load_file(path / "weights.safetensors"), map_location)
    return weights, torch.load(path / "state.pt", map_location="cpu", weights_only=True)


def load_latest(root: Path, map_location: DeviceMap = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest checkpoint that reads back whole; a truncated one is skipped with a warning (None: none)."""
    for path in reversed(checkpoints(root)):
        try:
            return load_checkpoint(path, map_location)
        except UNREADABLE as err:
            warnings.warn(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); falling back to the previous one",
                          stacklevel=2)
    return None
