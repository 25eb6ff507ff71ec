"""Lazy reading of a rollout directory: each step reads only the groups it draws.

A pool of 10⁴ prompts × 16 images at 512 px is tens of gigabytes of latents, so training must not load it
whole. :class:`RolloutPool` opens each shard memory-mapped (safetensors ``safe_open``) and copies out the
rows a step asks for; the eager :class:`~gdro_core.data.rollout.Rollouts` answers the same ``take`` call.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open

from gdro_core.data.rollout import MANIFEST, RolloutError
from gdro_core.data.store import read_json, sha256_file
from gdro_core.models.base import Condition

OPEN_SHARDS = 64
"""Shard handles kept open at once (least recently used closed first): bounds file descriptors, not memory."""


class RolloutPool:
    """A verified rollout directory whose latents and conditioning stay on disk until a step draws them."""

    def __init__(self, out_dir: Path, verify: bool = True):
        self.dir = Path(out_dir)
        if not (self.dir / MANIFEST).is_file():
            raise RolloutError(f"no rollouts at {self.dir} (missing {MANIFEST}): run `gdro rollout` first")
        manifest = read_json(self.dir / MANIFEST)
        self.rows: list[dict] = manifest["rows"]
        self.shards = list(manifest["shards"])
        if verify:  # streams every shard once through the hash; nothing stays in memory
            for name, digest in manifest["shards"].items():
                if not (self.dir / name).is_file() or sha256_file(self.dir / name) != digest:
                    raise RolloutError(f"{self.dir / name} does not match its hash in the manifest: rerun `gdro rollout`")
        self._open = lru_cache(maxsize=OPEN_SHARDS)(self._open_shard)
        starts, total, n, item, keys = [], 0, None, None, None
        for name in self.shards:
            f = self._open(name)
            shape = f.get_slice("latents").get_shape()
            starts.append(total)
            total += shape[0]
            n, item = shape[1], tuple(shape[2:])
            keys = [k.removeprefix("cond.") for k in f.keys() if k.startswith("cond.")]
        if not self.shards:
            raise RolloutError(f"{self.dir / MANIFEST} lists no shards: rerun `gdro rollout`")
        self._starts = torch.tensor(starts)
        self.shape: tuple[int, int] = (total, n)
        self.item_shape: tuple[int, ...] = item
        self.cond_keys: list[str] = keys

    def _open_shard(self, name: str):
        return safe_open(str(self.dir / name), framework="pt", device="cpu")

    def _locate(self, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shard = torch.searchsorted(self._starts, prompts, right=True) - 1
        return shard, prompts - self._starts[shard]

    def take(self, prompts: torch.Tensor, members: torch.Tensor) -> tuple[torch.Tensor, Condition]:
        """Latents (G, k, C, H, W) of ``members`` (G, k) of ``prompts`` (G,), and the prompts' conditioning."""
        if int(prompts.max()) >= self.shape[0] or int(prompts.min()) < 0:
            raise IndexError(f"prompt index out of range for a pool of {self.shape[0]} prompts")
        shard, local = self._locate(prompts)
        x0, cond = [], {k: [] for k in self.cond_keys}
        for s, i, m in zip(shard.tolist(), local.tolist(), members):
            f = self._open(self.shards[s])
            x0.append(f.get_slice("latents")[i][m])
            for k in self.cond_keys:
                cond[k].append(f.get_slice(f"cond.{k}")[i : i + 1])
        return torch.stack(x0), {k: torch.cat(v) for k, v in cond.items()}


def open_rollouts(out_dir: Path, verify: bool = True) -> RolloutPool:
    """The rollout directory as a lazily read pool (hashes checked against the manifest unless ``verify=False``)."""
    return RolloutPool(out_dir, verify)
