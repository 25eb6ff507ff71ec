"""Rollout and scoring throughput with 1 and 2 workers here, and a projection for an 8-GPU node.

Measured on this machine, through the same jobs and Prefect task runners the `rollout` and `score`
stages use (``gdro_core/data/fanout.py``, ``gdro_core/tasks/jobs.py``):

- in-process (``scale.runner: local``, the default), then a Dask LocalCluster of 1 and of 2 worker
  processes; each time includes starting the cluster and loading the model or reader in every worker;
- rollout: the default world's built-in model (params.yaml sizes, random weights: sampling cost does
  not depend on the weights), ``--prompts`` prompts × ``rollout.images_per_prompt`` images;
- scoring: the same number of clean renders of the prompts' strings (real glyphs for the reader).

Projected for one node of 8 GPUs, one worker per GPU (shards share nothing, so throughput is 8 × one
worker's): sampling cost per image = FLOPs of one SD3.5-Medium transformer forward at ``--resolution``
(counted by torch's FlopCounterMode on the meta device, as ``benchmarks/gpu_train_step.py`` counts
them) × ``--steps`` × 2 with CFG, at ``--mfu`` of ``--peak-tflops``; text encoders and VAE are left
out. Scoring is projected from the in-process reader rate measured here (one CPU reader per GPU
worker, no faster than this machine's cores). Run::

    python benchmarks/scaling.py                      # 128 images in 2 shards, a few minutes on 2 CPU cores
    python benchmarks/scaling.py --prompts 8 --shard-prompts 2    # 64 images in 4 shards
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gdro_core.data.fanout import RolloutJob, run_jobs, run_rollout_job  # noqa: E402
from gdro_core.data.rollout import generate_rollouts, plan_shards, prepare_rollouts  # noqa: E402
from gdro_core.data.scoring import score_task_rollouts  # noqa: E402
from gdro_core.models import load_model  # noqa: E402
from gdro_core.models.base import velocity  # noqa: E402
from gdro_core.models.builtin import build_builtin_pipeline  # noqa: E402
from gdro_core.params import Scale, load_params  # noqa: E402
from gdro_core.tasks.jobs import ScoreJob, run_score_job  # noqa: E402
from gdro_core.tasks.ocr.prompts import make_prompt_sets  # noqa: E402
from gdro_core.tasks.ocr.world import render_text  # noqa: E402
from gdro_core.tasks.registry import make_task  # noqa: E402


@task(cache_policy=NO_CACHE)
def rollout_shard(job: RolloutJob) -> dict:
    return run_rollout_job(job)


@task(cache_policy=NO_CACHE)
def score_chunk(job: ScoreJob):
    return run_score_job(job)


def sd3_forward_flops(resolution: int) -> int:
    """FLOPs of one SD3.5-Medium transformer forward on one image, through the family's velocity (meta device)."""
    spec = importlib.util.spec_from_file_location("gpu_train_step", ROOT / "benchmarks" / "gpu_train_step.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    model_spec = bench.FULL_SPECS["sd3.5-medium"]
    meta = torch.device("meta")
    model = bench.build_model(model_spec, meta, torch.bfloat16, resolution, 0)
    cond = {k: v.to(meta) for k, v in bench.make_cond(model_spec, 1, torch.Generator().manual_seed(0),
                                                      model.dtype).items()}
    x = torch.zeros((1, *model.latent_shape), device=meta)
    t = torch.full((1,), 0.5, device=meta)
    with torch.no_grad():
        return bench.count_flops(lambda: velocity(model, x, t, cond))


def project(args: argparse.Namespace, score_rate_1: float) -> dict:
    forward = sd3_forward_flops(args.resolution)
    per_image = forward * args.steps * (2 if args.cfg else 1)
    seconds = per_image / (args.peak_tflops * 1e12 * args.mfu)
    return {
        "forward_tflops": forward / 1e12, "sample_tflops_per_image": per_image / 1e12, "gpu_s_per_image": seconds,
        "rollout_images_per_s": args.gpus / seconds, "score_images_per_s": args.gpus * score_rate_1,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", default=str(ROOT / "params.yaml"))
    p.add_argument("--prompts", type=int, default=16, help="training prompts sampled and scored per configuration")
    p.add_argument("--shard-prompts", type=int, default=0,
                   help="prompts per shard (0 = sampler.batch_size / rollout.images_per_prompt, as the stage)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Dask worker counts to measure")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=40, help="sampling steps per image in the projection")
    p.add_argument("--cfg", action=argparse.BooleanOptionalAction, default=True, help="two forwards per step")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilisation of sampling")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--out", default=str(ROOT / "reports" / "benchmark" / "scaling.json"))
    args = p.parse_args(argv)
    params = load_params(args.params, {"model.source": "builtin", "model.device": "cpu", "model.dtype": "float32"})
    per = params.rollout.images_per_prompt
    w = params.world
    prompts = make_prompt_sets(w.alphabet, w.min_len, w.max_len, params.prompts.templates, args.prompts, 1,
                               seed=0)["train"]
    n_images = len(prompts) * per
    shard_prompts = args.shard_prompts or max(1, params.sampler.batch_size // per)
    work = Path(tempfile.mkdtemp(prefix="gdro-scaling-"))
    base = work / "base"
    build_builtin_pipeline(params.model.builtin, params.image_shape, params.sampler.shift, seed=0).save_pretrained(base)
    shards = plan_shards(prompts, per, params.rollout.seed, shard_prompts)
    # Scoring input: clean renders of each row's string, under the rows' image names.
    score_dir = work / "score"
    rows = [dict(r) for s in shards for r in s.rows]
    for r in rows:
        (score_dir / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        render_text(r["target"], w.height, w.width, w.font_size).save(score_dir / r["image"])
    size = per * shard_prompts
    chunks = [tuple(rows[i : i + size]) for i in range(0, len(rows), size)]

    def jobs_for(out: Path, threads: int) -> list[RolloutJob]:
        prepare_rollouts(out)
        return [RolloutJob(shard=s, params_json=params.model_dump_json(), base_dir=str(base), out_dir=str(out),
                           fingerprint="bench", threads=threads) for s in shards]

    @flow(name="scaling-benchmark")
    def measure() -> dict:
        cores = torch.get_num_threads()
        results = {}
        start = time.perf_counter()
        model = load_model(params, base)
        generate_rollouts(model, prompts, per, params.rollout.seed, params.sampler.steps, params.sampler.guidance,
                          shard_prompts, work / "local", "bench")
        t_roll = time.perf_counter() - start
        start = time.perf_counter()
        scorer = make_task(params)
        for c in chunks:
            score_task_rollouts(list(c), score_dir, scorer)
        results["local (1 process)"] = {"rollout_s": t_roll, "score_s": time.perf_counter() - start}
        for n in args.workers:
            scale = Scale(runner="dask", workers=n, threads_per_worker=max(1, cores // n))
            start = time.perf_counter()
            run_jobs(scale, rollout_shard, jobs_for(work / f"dask{n}", scale.threads_per_worker))
            t_roll = time.perf_counter() - start
            start = time.perf_counter()
            run_jobs(scale, score_chunk, [ScoreJob(rows=c, rollout_dir=str(score_dir), params_json=params.model_dump_json(),
                                                   threads=scale.threads_per_worker)
                                          for c in chunks])
            results[f"dask, {n} worker{'s' if n > 1 else ''}"] = {"rollout_s": t_roll,
                                                                   "score_s": time.perf_counter() - start}
        return results

    @flow(name="scaling-benchmark-warmup")
    def warmup() -> None:
        """Starts Prefect's temporary API server, so that its start-up is not on any clock."""

    warmup()
    measured = measure()
    for r in measured.values():
        r["rollout_images_per_s"] = n_images / r["rollout_s"]
        r["score_images_per_s"] = n_images / r["score_s"]
    projection = project(args, measured["local (1 process)"]["score_images_per_s"])
    report = {"images": n_images, "shards": len(shards), "sampler_steps": params.sampler.steps,
              "measured": measured, "projection": projection,
              "assumptions": {"gpus": args.gpus, "resolution": args.resolution, "steps": args.steps, "cfg": args.cfg,
                              "mfu": args.mfu, "peak_tflops": args.peak_tflops}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{n_images} images ({len(shards)} shards, {params.sampler.steps} steps) on {torch.get_num_threads()} "
          "CPU threads; times include cluster start and model/reader loading")
    print(f"{'configuration':<34}{'rollout img/s':>15}{'score img/s':>14}")
    for name, r in measured.items():
        print(f"{name:<34}{r['rollout_images_per_s']:>15.2f}{r['score_images_per_s']:>14.2f}")
    label = f"{args.gpus}-GPU node (projected)"
    print(f"{label:<34}{projection['rollout_images_per_s']:>15.2f}{projection['score_images_per_s']:>14.2f}")
    print(f"projection: SD3.5-Medium {args.resolution}px, {projection['forward_tflops']:.2f} TFLOP per forward x "
          f"{args.steps} steps{' x 2 (CFG)' if args.cfg else ''} = {projection['sample_tflops_per_image']:.1f} "
          f"TFLOP/image at MFU {args.mfu} of {args.peak_tflops:.0f} TFLOP/s = {projection['gpu_s_per_image']:.3f} "
          f"GPU-s/image; scoring = {args.gpus} x the in-process CPU reader rate measured here. Wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
