"""Lazy reading of a rollout directory: each step reads only the groups it draws.

A pool of 10⁴ prompts × 16 images at 512 px is tens of gigabytes of latents, so training must not load it
whole. :class:`RolloutPool` reads each shard's safetensors header once and then, per step, only the bytes of
the drawn members (positioned reads, no memory map: resident memory stays flat however much of the pool a
long run visits). The eager :class:`~gdro_core.data.rollout.Rollouts` answers the same ``take`` call.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from gdro_core.data.rollout import MANIFEST, RolloutError
from gdro_core.data.store import read_json, sha256_file
from gdro_core.models.base import Condition

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
"""safetensors dtype names of the floating tensors a rollout shard holds."""


@dataclass(frozen=True)
class _Entry:
    """Where one tensor of a shard lies: its dtype, shape and first byte in the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int

    def row_bytes(self, dims: int = 1) -> int:
        """Bytes of one index along the first ``dims`` dimensions."""
        return math.prod(self.shape[dims:]) * torch.empty((), dtype=self.dtype).element_size()


def read_header(path: Path) -> dict[str, _Entry]:
    """The safetensors header: an 8-byte little-endian length, then JSON with each tensor's dtype, shape, offsets."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise RolloutError(f"{path}: tensor {name} has dtype {info['dtype']}, not a float type a rollout holds")
        entries[name] = _Entry(DTYPES[info["dtype"]], tuple(info["shape"]), 8 + length + info["data_offsets"][0])
    return entries


def _read(fd: int, entry: _Entry, offset: int, shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape) * torch.empty((), dtype=entry.dtype).element_size()
    buf = bytearray(os.pread(fd, n, entry.start + offset))
    if len(buf) != n:
        raise RolloutError(f"short read of {n} bytes at {entry.start + offset}: the shard is truncated, rerun `gdro rollout`")
    return torch.frombuffer(buf, dtype=entry.dtype).reshape(shape)


class RolloutPool:
    """A verified rollout directory whose latents and conditioning stay on disk until a step draws them."""

    def __init__(self, out_dir: Path, verify: bool = True):
        self.dir = Path(out_dir)
        if not (self.dir / MANIFEST).is_file():
            raise RolloutError(f"no rollouts at {self.dir} (missing {MANIFEST}): run `gdro rollout` first")
        manifest = read_json(self.dir / MANIFEST)
        self.rows: list[dict] = manifest["rows"]
        self.fingerprint: str = manifest["fingerprint"]
        self.shards = list(manifest["shards"])
        if not self.shards:
            raise RolloutError(f"{self.dir / MANIFEST} lists no shards: rerun `gdro rollout`")
        if verify:  # streams every shard once through the hash; nothing stays in memory
            for name, digest in manifest["shards"].items():
                if not (self.dir / name).is_file() or sha256_file(self.dir / name) != digest:
                    raise RolloutError(f"{self.dir / name} does not match its hash in the manifest: rerun `gdro rollout`")
        self._headers = [read_header(self.dir / name) for name in self.shards]
        sizes = [h["latents"].shape[0] for h in self._headers]
        self._starts = torch.tensor([sum(sizes[:i]) for i in range(len(sizes))])
        first = self._headers[0]["latents"]
        self.shape: tuple[int, int] = (sum(sizes), first.shape[1])
        self.item_shape: tuple[int, ...] = first.shape[2:]
        self.cond_keys: list[str] = [k.removeprefix("cond.") for k in self._headers[0] if k.startswith("cond.")]

    def take(self, prompts: torch.Tensor, members: torch.Tensor) -> tuple[torch.Tensor, Condition]:
        """Latents (G, k, C, H, W) of ``members`` (G, k) of ``prompts`` (G,), and the prompts' conditioning."""
        if int(prompts.max()) >= self.shape[0] or int(prompts.min()) < 0:
            raise IndexError(f"prompt index out of range for a pool of {self.shape[0]} prompts")
        shard = torch.searchsorted(self._starts, prompts, right=True) - 1
        local = prompts - self._starts[shard]
        x0, cond = [], {k: [] for k in self.cond_keys}
        for s, i, ms in zip(shard.tolist(), local.tolist(), members.tolist()):
            header = self._headers[s]
            lat = header["latents"]
            fd = os.open(self.dir / self.shards[s], os.O_RDONLY)
            try:
                x0.append(torch.stack([_read(fd, lat, i * lat.row_bytes() + m * lat.row_bytes(2), self.item_shape)
                                       for m in ms]))
                for k in self.cond_keys:
                    entry = header[f"cond.{k}"]
                    cond[k].append(_read(fd, entry, i * entry.row_bytes(), (1, *entry.shape[1:])))
            finally:
                os.close(fd)
        return torch.stack(x0), {k: torch.cat(v) for k, v in cond.items()}


def open_rollouts(out_dir: Path, verify: bool = True) -> RolloutPool:
    """The rollout directory as a lazily read pool (hashes checked against the manifest unless ``verify=False``)."""
    return RolloutPool(out_dir, verify)
