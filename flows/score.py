"""Stage `score`: the reward table, one row per rollout image, scored once; chunks run in this process or
over a Dask or Ray task runner (params `scale`), with the same table either way."""

from __future__ import annotations

from typing import Any

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.context import load_layout
from gdro_core.layout import Layout
from gdro_core.tasks.jobs import ScoreJob, run_score_job
from gdro_core.tasks.registry import make_task
from gdro_core.data.rollout import MANIFEST, RolloutError
from gdro_core.data.fanout import run_jobs, worker_count, worker_threads
from gdro_core.data.scoring import check_errors, merge_tables, score_task_rollouts, split_rows, write_table
from gdro_core.data.store import read_json
from gdro_core.tracking.runs import stage_run


@task(cache_policy=NO_CACHE, retries=2)
def score_chunk(job: ScoreJob):
    """One chunk of images on whichever worker the runner picks, with that worker's reader."""
    return run_score_job(job)


@task(cache_policy=NO_CACHE)
def score_table(lay: Layout):
    logger = get_run_logger()
    if not (lay.rollout_dir / MANIFEST).is_file():
        again = f" --round {lay.round}" if lay.round > 1 else ""
        raise RolloutError(f"no rollouts at {lay.rollout_dir}: run `gdro rollout{again}` first")
    p = lay.params
    chunks = split_rows(read_json(lay.rollout_dir / MANIFEST))
    if p.scale.runner == "local":
        scorer = make_task(p)  # one task, so one reader, for every chunk
        parts = []
        for i, rows in enumerate(chunks, 1):
            parts.append(score_task_rollouts(rows, lay.rollout_dir, scorer))
            logger.info("scored chunk %d/%d", i, len(chunks))
    else:
        workers = worker_count(p.scale)
        logger.info("score: %d chunks on %s (%d workers)", len(chunks), p.scale.runner, workers)
        jobs = [
            ScoreJob(rows=tuple(rows), rollout_dir=str(lay.rollout_dir), params_json=p.model_dump_json(),
                     threads=worker_threads(p.scale, workers))
            for rows in chunks
        ]
        parts = run_jobs(p.scale, score_chunk, jobs, progress=lambda i, n: logger.info("scored chunk %d/%d", i, n))
    table = merge_tables(parts)
    failed = check_errors(table, p.reward.max_error_share)
    if failed:
        logger.warning("the reward failed on %d of %d images (scored 0; see the error column)", failed, len(table))
    write_table(table, lay.rewards, read_json(lay.rollout_dir / MANIFEST)["fingerprint"])
    return table


@flow(name="score")
def score_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None, round: int = 1) -> float:
    lay = load_layout(params_path, overrides, round)
    with stage_run(lay.params, lay.root, "score", round=round):
        table = score_table(lay)
        group_std = table.groupby("prompt_index")["reward"].std().mean()
        metrics = {
            "rollout_reward": float(table["reward"].mean()),
            **({"rollout_exact": float(table["exact"].mean())} if "exact" in table else {}),
            **({"rollout_strict": float(table["strict"].mean())} if "strict" in table else {}),
            "rollout_group_reward_std": float(group_std),
            **({"score_errors": int(table["error"].astype(bool).sum())} if "error" in table else {}),
        }
        mlflow.log_metrics(metrics)
        get_run_logger().info("reward table %s: %s", lay.rewards, metrics)
        return metrics["rollout_reward"]
