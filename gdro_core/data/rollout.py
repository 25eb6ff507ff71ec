"""Offline rollouts: N images per prompt from the frozen base, stored as hashed shards.

A rollout directory holds ``shard-XXXX.safetensors`` (clean latents and prompt conditioning),
``images/*.png`` and ``manifest.json`` (rows with seeds, shard hashes and a fingerprint of how
the data was made). Shards are written atomically one by one, so an interrupted rollout resumes;
a shard whose hash does not match the manifest is regenerated, never trusted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gdro_core.models.base import Condition, FlowModel
from gdro_core.tasks.base import PromptRecord
from gdro_core.models.sampling import sample
from gdro_core.data.store import atomic_write, read_json, sha256_file, write_json

MANIFEST = "manifest.json"
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


def image_seed(base_seed: int, prompt_index: int, member: int, per_prompt: int) -> int:
    return base_seed + prompt_index * per_prompt + member


def _shard_name(i: int) -> str:
    return f"shard-{i:04d}.safetensors"


def _valid_shards(out_dir: Path, fp: str) -> dict[str, str]:
    """Shards recorded under the same fingerprint whose content still matches their hash."""
    partial = out_dir / "progress.json"
    if not partial.is_file():
        return {}
    record = read_json(partial)
    if record.get("fingerprint") != fp:
        return {}
    return {
        name: digest
        for name, digest in record["shards"].items()
        if (out_dir / name).is_file() and sha256_file(out_dir / name) == digest
    }


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
    """Sample ``per_prompt`` images for every prompt; reuse valid shards; return the manifest."""
    out_dir = Path(out_dir)
    if is_complete(out_dir, fingerprint):
        return read_json(out_dir / MANIFEST)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    done = _valid_shards(out_dir, fingerprint)
    null = model.encode([""])
    rows: list[dict] = []
    n_shards = (len(prompts) + batch_prompts - 1) // batch_prompts
    for s in range(n_shards):
        idx = list(range(s * batch_prompts, min(len(prompts), (s + 1) * batch_prompts)))
        shard_rows = [
            {
                "prompt_index": i,
                "member": m,
                "prompt": prompts[i].prompt,
                "target": prompts[i].target,
                "seed": image_seed(base_seed, i, m, per_prompt),
                "image": f"images/{i:05d}_{m:03d}.png",
            }
            for i in idx
            for m in range(per_prompt)
        ]
        rows += shard_rows
        name = _shard_name(s)
        if name not in done:
            with torch.no_grad():
                cond = model.encode([prompts[i].prompt for i in idx])
                rep = {k: v.repeat_interleave(per_prompt, 0) for k, v in cond.items()}
                x0 = sample(model, rep, null, [r["seed"] for r in shard_rows], steps, guidance)
            for r, im in zip(shard_rows, model.decode(x0)):
                atomic_write(out_dir / r["image"], lambda p, im=im: im.save(p, format="PNG"))
            tensors = {"latents": x0.cpu().reshape(len(idx), per_prompt, *x0.shape[1:]).contiguous()}
            tensors |= {f"cond.{k}": v.float().cpu().contiguous() for k, v in cond.items()}
            atomic_write(out_dir / name, lambda p, t=tensors: save_file(t, str(p)))
            done[name] = sha256_file(out_dir / name)
            write_json(out_dir / "progress.json", {"fingerprint": fingerprint, "shards": done})
        if progress:
            progress(s + 1, n_shards)
    manifest = {
        "fingerprint": fingerprint,
        "per_prompt": per_prompt,
        "shards": {_shard_name(s): done[_shard_name(s)] for s in range(n_shards)},
        "rows": rows,
    }
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def is_complete(out_dir: Path, fingerprint: str) -> bool:
    """True when the manifest matches ``fingerprint`` and every shard and image matches its record."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return False
    manifest = read_json(path)
    if manifest.get("fingerprint") != fingerprint:
        return False
    shards_ok = all(
        (out_dir / n).is_file() and sha256_file(out_dir / n) == h for n, h in manifest["shards"].items()
    )
    return shards_ok and all((out_dir / r["image"]).is_file() for r in manifest["rows"])


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
