"""Stage `rollout`: N images per training prompt from the frozen base, cached by content hash."""

from __future__ import annotations

from typing import Any

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.context import load_layout
from gdro_core.models import load_flow_model
from gdro_core.models.identity import base_fingerprint
from gdro_core.layout import Layout
from gdro_core.tasks import make_task, world_of
from gdro_core.data.rollout import generate_rollouts
from gdro_core.data.store import dir_hash, fingerprint, sha256_file
from gdro_core.tracking.runs import stage_run


def rollout_fingerprint(lay: Layout) -> str:
    """Everything the rollouts depend on: base weights, prompts, sampler and rollout params."""
    p = lay.params
    return fingerprint(
        {
            "base": dir_hash(lay.base_dir),
            "prompts": sha256_file(lay.prompts("train")),
            "sampler": p.sampler.model_dump(),
            "rollout": p.rollout.model_dump(),
            "model": p.model.source,
            "base_fingerprint": base_fingerprint(p.model.source, lay.base_dir),
        }
    )


@task(cache_policy=NO_CACHE)
def sample_pools(lay: Layout) -> dict:
    p = lay.params
    logger = get_run_logger()
    model = load_flow_model(p.model.source, lay.base_dir, world_of(p), p.model.device, p.model.dtype,
                            shift=p.sampler.shift, guidance=p.sampler.guidance)
    prompts = make_task(p).read_prompts(lay.prompts("train"))
    per_batch = max(1, p.sampler.batch_size // p.rollout.images_per_prompt)
    return generate_rollouts(
        model, prompts, p.rollout.images_per_prompt, p.rollout.seed, p.sampler.steps, p.sampler.guidance,
        per_batch, lay.rollout_dir, rollout_fingerprint(lay),
        progress=lambda i, n: logger.info("rollout shard %d/%d", i, n),
    )


@flow(name="rollout")
def rollout_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None) -> int:
    lay = load_layout(params_path, overrides)
    with stage_run(lay.params, lay.root, "rollout", ("model", "sampler", "rollout")):
        manifest = sample_pools(lay)
        mlflow.log_metric("rollout_images", len(manifest["rows"]))
        mlflow.log_param("rollout_fingerprint", manifest["fingerprint"])
        mlflow.set_tag("data.base_fingerprint", base_fingerprint(lay.params.model.source, lay.base_dir))
        get_run_logger().info("%d rollout images in %s", len(manifest["rows"]), lay.rollout_dir)
        return len(manifest["rows"])
