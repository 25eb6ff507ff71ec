"""Where the offline cost goes, and what cuts it: the OCR reader's modes and the rollout sampler's step count.

**Reader modes** (``reward.reader_mode``). easyocr's full reader runs the CRAFT text detector on every image,
then the recognizer on each box. The built-in world's images hold one line of text, so the recognizer alone,
on the ink's bounding box, can stand in for it, but only where it reads the same. This measures, for the
full reader image by image (easyocr's ``readtext``, the old scoring path), the full reader batched
(``readtext_batched``) and the recognizer alone (batched), the CPU and wall seconds per image and how often
each reads exactly what the per-image full reader reads (same normalised text) and gives the same reward:

- on the **ceiling renders**: the world's clean renders of the held-out targets (what ``ceiling.reward`` reads);
- on **rollouts**: the first ``--rollout-images`` images of ``data/rollouts`` (the base's own samples, with
  their malformed and wrong digits), which is what the score stage reads.

**Sampler steps.** The method is sampler-independent: the offline data only need to be samples of the base.
For each ``--sampler-steps`` value, ``--prompts`` training prompts × ``rollout.images_per_prompt`` images are
sampled from the base (same seeds) and scored; the table gives the mean reward, its spread over prompts and the
generation cost, so a cheaper sampler can be chosen where the reward distribution does not move.

Wall seconds stretch on a loaded machine; CPU seconds (this process, all threads) are printed beside them.
Writes ``reports/benchmark/offline_cost.json``. Run after ``dvc repro score``::

    python benchmarks/offline_cost.py
    python benchmarks/offline_cost.py --rollout-images 128 --sampler-steps 5 10 20 --prompts 16
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

from gdro_core.data.rollout import MANIFEST, generate_rollouts
from gdro_core.data.store import read_json, write_json
from gdro_core.layout import Layout
from gdro_core.models import load_model
from gdro_core.params import load_params
from gdro_core.tasks.ocr.prompts import read_prompts
from gdro_core.tasks.ocr.reader import EasyOcrReader, prepare
from gdro_core.tasks.ocr.reward import normalise, ocr_reward, score_rollouts
from gdro_core.tasks.ocr.world import render_text

OUT_NAME = "offline_cost"


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, *args):
    w0, c0 = time.perf_counter(), cpu_seconds()
    out = fn(*args)
    return out, time.perf_counter() - w0, cpu_seconds() - c0


def per_image_full(reader: EasyOcrReader, images: list[Image.Image]) -> list[str]:
    """The old scoring path: easyocr's ``readtext`` on one image at a time."""
    out = []
    for im in images:
        parts = reader.reader.readtext(prepare(im, reader.upscale, reader.pad), detail=1,
                                       allowlist=reader.allowlist, paragraph=False)
        parts = sorted(parts, key=lambda q: min(pt[0] for pt in q[0]))
        out.append("".join(q[1] for q in parts))
    return out


def compare_modes(images: list[Image.Image], targets: list[str], upscale: int, pad: int, allowlist: str | None,
                  batch: int) -> dict:
    """Cost per image and agreement with the per-image full reader, for each way of reading."""
    full = EasyOcrReader(upscale, pad, allowlist, mode="full")
    rec = EasyOcrReader(upscale, pad, allowlist, mode="recognizer")
    full.read(images[:2]), rec.read(images[:2])  # warm-up, untimed

    def batched(reader):
        return lambda ims: [r for s in range(0, len(ims), batch) for r in reader.read(ims[s : s + batch])]

    ways = {"full_per_image": lambda ims: per_image_full(full, ims), "full_batched": batched(full),
            "recognizer": batched(rec)}
    reads, out = {}, {}
    for name, fn in ways.items():
        reads[name], wall, cpu = timed(fn, images)
        out[name] = {"wall_s_per_image": wall / len(images), "cpu_s_per_image": cpu / len(images)}
    ref = [normalise(r) for r in reads["full_per_image"]]
    ref_rewards = [ocr_reward(r, t).reward for r, t in zip(ref, targets)]
    for name in ways:
        got = [normalise(r) for r in reads[name]]
        rewards = [ocr_reward(r, t).reward for r, t in zip(got, targets)]
        out[name] |= {
            "same_read": sum(a == b for a, b in zip(got, ref)) / len(ref),
            "same_reward": sum(abs(a - b) < 1e-9 for a, b in zip(rewards, ref_rewards)) / len(ref),
            "mean_reward": statistics.fmean(rewards),
            "mean_abs_reward_diff": statistics.fmean(abs(a - b) for a, b in zip(rewards, ref_rewards)),
            "disagreements": [(t, a, b) for t, a, b in zip(targets, ref, got) if a != b][:10],
        }
    out["images"] = len(images)
    return out


def sampler_steps(lay: Layout, steps_list: list[int], n_prompts: int, reader_mode: str) -> dict:
    """Mean reward and generation cost of the base's rollouts for each sampler step count."""
    p = lay.params
    model = load_model(p, lay.base_dir)
    prompts = read_prompts(lay.prompts("train"))[:n_prompts]
    reader = EasyOcrReader(p.reward.upscale, p.reward.pad,
                           p.world.alphabet if p.reward.restrict_to_alphabet else None, mode=reader_mode)
    per_batch = max(1, p.sampler.batch_size // p.rollout.images_per_prompt)
    out = {}
    for steps in steps_list:
        with tempfile.TemporaryDirectory() as tmp:
            manifest, wall, cpu = timed(lambda: generate_rollouts(
                model, prompts, p.rollout.images_per_prompt, p.rollout.seed, steps, p.sampler.guidance, per_batch,
                Path(tmp), f"steps{steps}"))
            table = score_rollouts(manifest["rows"], Path(tmp), reader, p.reward.substring_full_credit,
                                   p.reward.batch_size)
        by_prompt = table.groupby("prompt_index")["reward"]
        out[str(steps)] = {
            "mean_reward": float(table["reward"].mean()), "exact": float(table["exact"].mean()),
            "sd_of_prompt_means": float(by_prompt.mean().std()),
            "mean_within_prompt_sd": float(by_prompt.std().mean()),
            "generation_wall_s": wall, "generation_cpu_s": cpu, "images": len(table),
        }
        print(f"sampler steps {steps}: reward {out[str(steps)]['mean_reward']:.3f}, generation {wall:.1f} s wall, "
              f"{cpu:.1f} s CPU for {len(table)} images", flush=True)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--ceiling-images", type=int, default=128, help="held-out targets rendered clean")
    ap.add_argument("--rollout-images", type=int, default=256, help="rollout images read (0 skips them)")
    ap.add_argument("--sampler-steps", nargs="*", type=int, default=[5, 10, 20], help="empty skips the sweep")
    ap.add_argument("--prompts", type=int, default=16, help="training prompts per sampler-steps setting")
    ap.add_argument("--reader-mode", choices=["full", "recognizer"], default="recognizer",
                    help="reader that scores the sampler-steps sweep")
    ap.add_argument("--out-dir", type=Path)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    root = args.root.resolve()
    p = load_params(args.params if args.params.is_absolute() else root / args.params)
    lay = Layout(root=root, params=p)
    if p.reward.backend != "easyocr":
        raise SystemExit(f"reader modes are easyocr's; params has reward.backend {p.reward.backend!r}")
    allow = p.world.alphabet if p.reward.restrict_to_alphabet else None
    report: dict = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    targets = [q.target for q in read_prompts(lay.prompts("test"))]
    targets = (targets * (args.ceiling_images // max(1, len(targets)) + 1))[: args.ceiling_images]
    renders = [render_text(t, p.world.height, p.world.width, p.world.font_size) for t in targets]
    report["ceiling"] = compare_modes(renders, targets, p.reward.upscale, p.reward.pad, allow, p.reward.batch_size)
    if args.rollout_images:
        if not (lay.rollout_dir / MANIFEST).is_file():
            raise SystemExit(f"no rollouts at {lay.rollout_dir}: run `dvc repro rollout` first (or --rollout-images 0)")
        rows = read_json(lay.rollout_dir / MANIFEST)["rows"]
        rows = random.Random(0).sample(rows, min(args.rollout_images, len(rows)))
        images = [Image.open(lay.rollout_dir / r["image"]).copy() for r in rows]
        report["rollouts"] = compare_modes(images, [r["target"] for r in rows], p.reward.upscale, p.reward.pad,
                                           allow, p.reward.batch_size)
    if args.sampler_steps:
        report["sampler_steps"] = sampler_steps(lay, args.sampler_steps, args.prompts, args.reader_mode)
    out_dir = args.out_dir or lay.reports_dir / "benchmark"
    write_json(out_dir / f"{OUT_NAME}.json", report)
    for source in ("ceiling", "rollouts"):
        if source not in report:
            continue
        r = report[source]
        print(f"{source} ({r['images']} images): way, CPU s/image, wall s/image, same read, same reward, mean reward")
        for way in ("full_per_image", "full_batched", "recognizer"):
            w = r[way]
            print(f"  {way:<15} {w['cpu_s_per_image']:.4f} {w['wall_s_per_image']:.4f} {w['same_read']:.3f} "
                  f"{w['same_reward']:.3f} {w['mean_reward']:.3f}")
    print(f"written to {out_dir / OUT_NAME}.json")
    return report


if __name__ == "__main__":
    main()
