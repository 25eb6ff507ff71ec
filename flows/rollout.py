"""Stage `rollout`: N images per training prompt from the frozen base, cached by content hash; shards run in
this process or over a Dask or Ray task runner (params `scale`), with the same bytes either way.

A later round (``--round N``) samples from the base with round N-1's adapter applied: the policy's own images."""

from __future__ import annotations

from typing import Any

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.context import load_layout
from gdro_core.models import load_model
from gdro_core.models.identity import base_fingerprint
from gdro_core.cache_keys import rollout_fingerprint
from gdro_core.layout import Layout
from gdro_core.tasks.registry import make_task
from gdro_core.data.fanout import RolloutJob, run_jobs, run_rollout_job, worker_count, worker_threads
from gdro_core.data.rollout import (
    MANIFEST, generate_rollouts, is_complete, pending_shards, plan_shards, prepare_rollouts, write_manifest,
)
from gdro_core.data.store import read_json
from gdro_core.params import check_round_seeds
from gdro_core.tracking.runs import stage_run


def policy_adapter(lay: Layout) -> str:
    """The adapter the rollouts are sampled with: none in round 1 (the base), round N-1's in round N."""
    return str(lay.previous_adapter()) if lay.round > 1 else ""


@task(cache_policy=NO_CACHE, retries=2)
def rollout_shard(job: RolloutJob) -> dict:
    """One shard on whichever worker the runner picks; a retry finds finished work and keeps it."""
    return run_rollout_job(job)


@task(cache_policy=NO_CACHE)
def sample_pools(lay: Layout, fp: str) -> dict:
    """All shards in this process with the model loaded once (scale.runner: local)."""
    p = lay.params
    logger = get_run_logger()
    model = load_model(p, lay.base_dir)
    if lay.round > 1:
        model.load_adapter(lay.previous_adapter())
    prompts = make_task(p).read_prompts(lay.prompts("train"))
    return generate_rollouts(
        model, prompts, p.rollout.images_per_prompt, p.rollout.seed, p.rollout_steps, p.sampler.guidance,
        shard_prompts(p), lay.rollout_dir, fp,
        progress=lambda i, n: logger.info("rollout shard %d/%d", i, n),
    )


def shard_prompts(p) -> int:
    return max(1, p.sampler.batch_size // p.rollout.images_per_prompt)


def fan_out_pools(lay: Layout, fp: str) -> dict:
    """Shards mapped over the Dask or Ray task runner; the manifest is written once all verify."""
    p = lay.params
    logger = get_run_logger()
    shards = plan_shards(make_task(p).read_prompts(lay.prompts("train")), p.rollout.images_per_prompt, p.rollout.seed,
                         shard_prompts(p))
    prepare_rollouts(lay.rollout_dir)
    todo = pending_shards(lay.rollout_dir, shards, fp)
    workers = worker_count(p.scale)
    logger.info("rollout: %d of %d shards to sample on %s (%d workers)", len(todo), len(shards), p.scale.runner,
                workers)
    jobs = [
        RolloutJob(shard=s, params_json=p.model_dump_json(), base_dir=str(lay.base_dir), out_dir=str(lay.rollout_dir),
                   fingerprint=fp, threads=worker_threads(p.scale, workers), adapter_dir=policy_adapter(lay))
        for s in todo
    ]
    run_jobs(p.scale, rollout_shard, jobs, progress=lambda i, n: logger.info("rollout shard %d/%d", i, n))
    return write_manifest(lay.rollout_dir, shards, p.rollout.images_per_prompt, fp)


@flow(name="rollout")
def rollout_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None, round: int = 1) -> int:
    lay = load_layout(params_path, overrides, round)
    with stage_run(lay.params, lay.root, "rollout", round=round):
        if round > 1:
            check_round_seeds(lay.params, len(make_task(lay.params).read_prompts(lay.prompts("train"))))
        fp = rollout_fingerprint(lay)
        if is_complete(lay.rollout_dir, fp):
            manifest = read_json(lay.rollout_dir / MANIFEST)
        elif lay.params.scale.runner == "local":
            manifest = sample_pools(lay, fp)
        else:
            manifest = fan_out_pools(lay, fp)
        mlflow.log_metric("rollout_images", len(manifest["rows"]))
        mlflow.log_param("rollout_fingerprint", manifest["fingerprint"])
        mlflow.set_tag("data.base_fingerprint", base_fingerprint(lay.params.model.source, lay.base_dir))
        get_run_logger().info("%d rollout images in %s", len(manifest["rows"]), lay.rollout_dir)
        return len(manifest["rows"])
