"""Peak memory of offline training on a large rollout pool: read lazily (memory-mapped shards) against loaded whole.

Writes a synthetic rollout directory in the format ``gdro rollout`` writes (hashed ``shard-XXXX.safetensors``
with ``latents`` (P, N, C, H, W) and ``cond.*``, plus ``manifest.json``; random values, no images), then
trains a few steps of the real loop (:func:`gdro_core.training.loop.train`) on a small SD3 transformer in a
fresh process for each way of reading, once through :func:`gdro_core.data.pool.open_rollouts` (lazy; after
training it also reads every prompt of the pool once, as a long run would) and once through
:func:`gdro_core.data.rollout.load_rollouts` (eager). Each process reports its resident memory
before it touches the pool and its peak (``ru_maxrss``); the table sets both against the pool's size on disk::

    python benchmarks/pool_memory.py                          # 10^4 prompts x 8 images, 16x16x16 latents
    python benchmarks/pool_memory.py --prompts 2000 --images 16 --size 32 --steps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gdro_core.data.pool import open_rollouts  # noqa: E402
from gdro_core.data.rollout import MANIFEST, load_rollouts  # noqa: E402
from gdro_core.data.store import sha256_file, write_json  # noqa: E402
from gdro_core.params import Lora, Train  # noqa: E402
from gdro_core.training.loop import train  # noqa: E402

TOKENS, TEXT_DIM = 8, 32
"""Conditioning of the synthetic pool: tokens per prompt and their width (the tiny transformer's joint dim)."""
VISIT_BATCH = 64
"""Prompts read per call when the lazy run visits the whole pool after training."""


def write_pool(out: Path, prompts: int, images: int, channels: int, size: int, shard_prompts: int, seed: int) -> int:
    """A rollout directory of random latents and conditioning, written shard by shard; returns its bytes."""
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards, rows = {}, []
    for s, start in enumerate(range(0, prompts, shard_prompts)):
        n = min(shard_prompts, prompts - start)
        name = f"shard-{s:04d}.safetensors"
        save_file({
            "latents": torch.randn(n, images, channels, size, size, generator=gen),
            "cond.encoder_hidden_states": torch.randn(n, TOKENS, TEXT_DIM, generator=gen),
            "cond.pooled_projections": torch.randn(n, TEXT_DIM, generator=gen),
        }, str(out / name))
        shards[name] = sha256_file(out / name)
        rows += [{"prompt_index": start + i, "member": m, "seed": seed + (start + i) * images + m}
                 for i in range(n) for m in range(images)]
    write_json(out / MANIFEST, {"fingerprint": "synthetic", "per_prompt": images, "shards": shards, "rows": rows})
    return sum((out / name).stat().st_size for name in shards)


class TinyFlowModel:
    """Just what the offline loop needs of a FlowModel: a small SD3 transformer sized for the pool's latents."""

    def __init__(self, channels: int, size: int):
        from diffusers import SD3Transformer2DModel

        torch.manual_seed(0)
        self.transformer = SD3Transformer2DModel(
            sample_size=size, patch_size=2, in_channels=channels, out_channels=channels, num_layers=2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=32,
            pooled_projection_dim=TEXT_DIM, pos_embed_max_size=max(size, 32),
        )
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def velocity(self, x, t, cond, guidance=None):
        """The SD3 family's velocity call (what :func:`gdro_core.models.base.velocity` dispatches to)."""
        from gdro_core.models.sd3 import sd3_velocity

        return sd3_velocity(self, x, t, cond)


def rss_mib() -> float:
    """Current resident set size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_child(mode: str, pool: Path, steps: int, channels: int, size: int) -> dict:
    """Train ``steps`` steps reading the pool ``mode``-ly; report RSS before the pool and the process's peak."""
    torch.set_num_threads(1)
    model = TinyFlowModel(channels, size)
    before = rss_mib()
    t0 = time.perf_counter()
    data = open_rollouts(pool) if mode == "lazy" else load_rollouts(pool)
    opened = time.perf_counter() - t0
    rewards = torch.rand(*data.shape, generator=torch.Generator().manual_seed(1))
    cfg = Train(steps=steps, group_size=4, groups_per_step=8, checkpoint_every=10**6, log_every=1,
                lora=Lora(rank=4, alpha=4.0))
    losses: list[float] = []
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as ckpt:
        train(model, data, rewards, cfg, Path(ckpt), lambda s, m: losses.append(m["train/loss"]))
    trained = time.perf_counter() - t1
    if mode == "lazy":  # then visit every prompt once, as a long run eventually does: memory must not follow
        everyone = torch.arange(data.shape[0])
        for chunk in everyone.split(VISIT_BATCH):
            data.take(chunk, torch.zeros(len(chunk), cfg.group_size, dtype=torch.long))
    return {"mode": mode, "rss_before_mib": before, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "open_s": opened, "train_s": trained, "final_loss": losses[-1]}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=10_000)
    ap.add_argument("--images", type=int, default=8, help="images per prompt (N)")
    ap.add_argument("--channels", type=int, default=16, help="latent channels")
    ap.add_argument("--size", type=int, default=16, help="latent height and width")
    ap.add_argument("--shard-prompts", type=int, default=64, help="prompts per shard")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dir", type=Path, help="where to write the pool (default: a temporary directory)")
    ap.add_argument("--child", choices=["lazy", "eager"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, args.dir, args.steps, args.channels, args.size)))
        return []
    with tempfile.TemporaryDirectory() as tmp:
        pool = args.dir or Path(tmp) / "rollouts"
        disk = write_pool(pool, args.prompts, args.images, args.channels, args.size, args.shard_prompts, seed=0)
        results = []
        for mode in ("lazy", "eager"):
            cmd = [sys.executable, __file__, "--child", mode, "--dir", str(pool), "--steps", str(args.steps),
                   "--channels", str(args.channels), "--size", str(args.size)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"pool: {args.prompts} prompts x {args.images} images of {args.channels}x{args.size}x{args.size} latents, "
          f"{disk / 2**20:.0f} MiB on disk; {args.steps} training steps of 8 groups x 4")
    print(f"{'reading':<8} {'RSS before pool':>16} {'peak RSS':>10} {'peak - before':>14} {'open s':>8} {'train s':>8}")
    for r in results:
        print(f"{r['mode']:<8} {r['rss_before_mib']:>12.0f} MiB {r['peak_rss_mib']:>6.0f} MiB "
              f"{r['peak_rss_mib'] - r['rss_before_mib']:>10.0f} MiB {r['open_s']:>8.1f} {r['train_s']:>8.1f}")
    if abs(results[0]["final_loss"] - results[1]["final_loss"]) > 1e-4 * max(1.0, abs(results[1]["final_loss"])):
        raise SystemExit(f"lazy and eager reading trained differently: {results}")
    return results


if __name__ == "__main__":
    main()
