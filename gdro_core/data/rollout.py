"""Offline rollouts: N images per prompt from the frozen base, stored as hashed shards.

A rollout directory holds ``shard-XXXX.safetensors`` (clean latents and prompt conditioning),
``images/*.png``, one ``records/shard-XXXX.json`` per shard (its rows, the shard's and every PNG's
sha256) and ``manifest.json`` (all rows, shard and image hashes, and a fingerprint of how the data
was made). A shard is a unit of work that depends only on its prompts and seeds: it writes its own
files and nothing else, so shards can run in any order, on any worker, and the result is the same
bytes. A shard whose record, file or any image does not verify is made again, never trusted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from gdro_core.data.store import TMP_SUFFIX, atomic_write, read_json, sha256_file, write_json
from gdro_core.tasks.base import PromptRecord

if TYPE_CHECKING:  # the model stack (diffusers) loads only where a shard is sampled: reading rollouts needs none
    from gdro_core.models.base import Condition, FlowModel

MANIFEST = "manifest.json"
RECORDS = "records"
Progress = Callable[[int, int], None]


class RolloutError(ValueError):
    """A rollout directory that cannot be used as it is."""


@dataclass(frozen=True)
class Rollouts:
    latents: torch.Tensor  # (P, N, C, H, W)
    cond: Condition  # per prompt, batch-first (P, ...)
    rows: list[dict]  # one per image: prompt_index, member, prompt, target, seed, image

    @property
    def shape(self) -> tuple[int, int]:
        """(prompts, images per prompt)."""
        return tuple(self.latents.shape[:2])

    @property
    def item_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one latent."""
        return tuple(self.latents.shape[2:])

    def take(self, prompts: torch.Tensor, members: torch.Tensor) -> tuple[torch.Tensor, Condition]:
        """Latents (G, k, C, H, W) of ``members`` (G, k) of ``prompts`` (G,), and the prompts' conditioning."""
        return self.latents[prompts.unsqueeze(1), members], {k: v[prompts] for k, v in self.cond.items()}


@dataclass(frozen=True)
class Shard:
    """One unit of rollout work: a few consecutive prompts, all their images and seeds."""

    index: int
    rows: tuple[dict, ...]

    @property
    def name(self) -> str:
        return f"shard-{self.index:04d}.safetensors"

    @property
    def record(self) -> str:
        return f"{RECORDS}/shard-{self.index:04d}.json"

    @property
    def prompts(self) -> list[str]:
        """The shard's prompts in order, one per prompt index."""
        return [r["prompt"] for r in self.rows if r["member"] == 0]


def image_seed(base_seed: int, prompt_index: int, member: int, per_prompt: int) -> int:
    return base_seed + prompt_index * per_prompt + member


def plan_shards(prompts: Sequence[PromptRecord], per_prompt: int, base_seed: int, batch_prompts: int) -> list[Shard]:
    """Split the prompts into shards of ``batch_prompts`` prompts with every image's row and seed."""
    shards = []
    for s, start in enumerate(range(0, len(prompts), batch_prompts)):
        rows = tuple(
            {
                "prompt_index": i,
                "member": m,
                "prompt": prompts[i].prompt,
                "target": prompts[i].target,
                "seed": image_seed(base_seed, i, m, per_prompt),
                "image": f"images/{i:05d}_{m:03d}.png",
            }
            for i in range(start, min(len(prompts), start + batch_prompts))
            for m in range(per_prompt)
        )
        shards.append(Shard(s, rows))
    return shards


def shard_is_valid(out_dir: Path, shard: Shard, fingerprint: str) -> bool:
    """True when the shard's record matches this plan and its file and every image match their hashes."""
    out_dir = Path(out_dir)
    path = out_dir / shard.record
    if not path.is_file():
        return False
    record = read_json(path)
    if record.get("fingerprint") != fingerprint or record.get("rows") != list(shard.rows):
        return False
    files = {shard.name: record["sha256"], **record["images"]}
    return all((out_dir / n).is_file() and sha256_file(out_dir / n) == h for n, h in files.items())


def write_shard(
    model: FlowModel, shard: Shard, per_prompt: int, steps: int, guidance: float, out_dir: Path, fingerprint: str,
    null: Condition | None = None,
) -> dict:
    """Sample one shard; write its PNGs, then its tensors, then its record (last: it vouches for the rest)."""
    from gdro_core.models.sampling import sample

    out_dir = Path(out_dir)
    null = model.encode([""]) if null is None else null
    with torch.no_grad():
        cond = model.encode(shard.prompts)
        rep = {k: v.repeat_interleave(per_prompt, 0) for k, v in cond.items()}
        x0 = sample(model, rep, null, [r["seed"] for r in shard.rows], steps, guidance)
    images = {}
    for r, im in zip(shard.rows, model.decode(x0)):
        atomic_write(out_dir / r["image"], lambda p, im=im: im.save(p, format="PNG"))
        images[r["image"]] = sha256_file(out_dir / r["image"])
    n = len(shard.prompts)
    tensors = {"latents": x0.cpu().reshape(n, per_prompt, *x0.shape[1:]).contiguous()}
    tensors |= {f"cond.{k}": v.float().cpu().contiguous() for k, v in cond.items()}
    atomic_write(out_dir / shard.name, lambda p: save_file(tensors, str(p)))
    record = {
        "fingerprint": fingerprint, "shard": shard.name, "sha256": sha256_file(out_dir / shard.name),
        "images": images, "rows": list(shard.rows),
    }
    write_json(out_dir / shard.record, record)
    return record


def clean_stale(out_dir: Path) -> list[Path]:
    """Remove temporary files a killed writer left behind (DVC ignores them, but they waste space)."""
    stale = [p for p in Path(out_dir).rglob(f"*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    legacy = Path(out_dir) / "progress.json"  # the single progress file of earlier versions
    legacy.unlink(missing_ok=True)
    return stale


def prepare_rollouts(out_dir: Path) -> None:
    """Create the directory tree before shards are written (by any worker) and drop stale temp files."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / RECORDS).mkdir(parents=True, exist_ok=True)
    clean_stale(out_dir)


def pending_shards(out_dir: Path, shards: Sequence[Shard], fingerprint: str) -> list[Shard]:
    """The shards that still need sampling (missing or not verifying); the rest are reused as they are."""
    return [s for s in shards if not shard_is_valid(out_dir, s, fingerprint)]


def write_manifest(out_dir: Path, shards: Sequence[Shard], per_prompt: int, fingerprint: str) -> dict:
    """Collect the shard records in shard order into ``manifest.json``; every shard must verify first."""
    out_dir = Path(out_dir)
    bad = pending_shards(out_dir, shards, fingerprint)
    if bad:
        names = ", ".join(s.name for s in bad[:5])
        raise RolloutError(
            f"{len(bad)} rollout shard(s) in {out_dir} are missing or do not verify ({names}): rerun `gdro rollout`"
        )
    records = [read_json(out_dir / s.record) for s in shards]
    manifest = {
        "fingerprint": fingerprint,
        "per_prompt": per_prompt,
        "shards": {r["shard"]: r["sha256"] for r in records},
        "images": {k: v for r in records for k, v in r["images"].items()},
        "rows": [row for r in records for row in r["rows"]],
    }
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def generate_rollouts(
    model: FlowModel,
    prompts: Sequence[PromptRecord],
    per_prompt: int,
    base_seed: int,
    steps: int,
    guidance: float,
    batch_prompts: int,
    out_dir: Path,
    fingerprint: str,
    progress: Progress | None = None,
) -> dict:
    """Sample ``per_prompt`` images for every prompt in this process; reuse valid shards; return the manifest.

    ``progress(i, n)`` counts the shards this call samples (``n`` of them), not the ones it finds finished, so a
    resumed run reports only its own work; ``n`` below the plan's shard count says how many were reused."""
    out_dir = Path(out_dir)
    if is_complete(out_dir, fingerprint):
        return read_json(out_dir / MANIFEST)
    prepare_rollouts(out_dir)
    shards = plan_shards(prompts, per_prompt, base_seed, batch_prompts)
    todo = pending_shards(out_dir, shards, fingerprint)
    null = model.encode([""]) if todo else None
    for done, s in enumerate(todo, 1):
        write_shard(model, s, per_prompt, steps, guidance, out_dir, fingerprint, null)
        if progress:
            progress(done, len(todo))
    return write_manifest(out_dir, shards, per_prompt, fingerprint)


def is_complete(out_dir: Path, fingerprint: str) -> bool:
    """True when the manifest matches ``fingerprint`` and every shard and image matches its recorded hash."""
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if not path.is_file():
        return False
    manifest = read_json(path)
    if manifest.get("fingerprint") != fingerprint or "images" not in manifest:
        return False
    files = {**manifest["shards"], **manifest["images"]}
    if set(manifest["images"]) != {r["image"] for r in manifest["rows"]}:
        return False
    return all((out_dir / n).is_file() and sha256_file(out_dir / n) == h for n, h in files.items())


def load_rollouts(out_dir: Path) -> Rollouts:
    """Latents and conditioning of a complete rollout directory, verified against the manifest."""
    out_dir = Path(out_dir)
    if not (out_dir / MANIFEST).is_file():
        raise RolloutError(f"no rollouts at {out_dir} (missing {MANIFEST}): run `gdro rollout` first")
    manifest = read_json(out_dir / MANIFEST)
    parts = []
    for name, digest in manifest["shards"].items():
        if sha256_file(out_dir / name) != digest:
            raise RolloutError(f"{out_dir / name} does not match its hash in the manifest: rerun `gdro rollout`")
        parts.append(load_file(out_dir / name))
    latents = torch.cat([p["latents"] for p in parts])
    keys = [k for k in parts[0] if k.startswith("cond.")]
    cond = {k.removeprefix("cond."): torch.cat([p[k] for p in parts]) for k in keys}
    return Rollouts(latents=latents, cond=cond, rows=manifest["rows"])
