"""Stage `score`: the reward table, one row per rollout image, scored once."""

from __future__ import annotations

from typing import Any

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.context import load_layout
from gdro_core.layout import Layout
from gdro_core.tasks import make_task
from gdro_core.data.rollout import MANIFEST, RolloutError
from gdro_core.data.scoring import score_task_rollouts, write_table
from gdro_core.data.store import read_json
from gdro_core.tracking.runs import stage_run


@task(cache_policy=NO_CACHE)
def score_table(lay: Layout):
    logger = get_run_logger()
    if not (lay.rollout_dir / MANIFEST).is_file():
        raise RolloutError(f"no rollouts at {lay.rollout_dir}: run `gdro rollout` first")
    rows = read_json(lay.rollout_dir / MANIFEST)["rows"]
    table = score_task_rollouts(
        rows, lay.rollout_dir, make_task(lay.params), progress=lambda i, n: logger.info("scored %d/%d images", i, n),
    )
    write_table(table, lay.rewards)
    return table


@flow(name="score")
def score_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None) -> float:
    lay = load_layout(params_path, overrides)
    with stage_run(lay.params, lay.root, "score", ("task", "reward", "geneval")):
        table = score_table(lay)
        group_std = table.groupby("prompt_index")["reward"].std().mean()
        metrics = {
            "rollout_reward": float(table["reward"].mean()),
            **({"rollout_exact": float(table["exact"].mean())} if "exact" in table else {}),
            **({"rollout_strict": float(table["strict"].mean())} if "strict" in table else {}),
            "rollout_group_reward_std": float(group_std),
        }
        mlflow.log_metrics(metrics)
        get_run_logger().info("reward table %s: %s", lay.rewards, metrics)
        return metrics["rollout_reward"]
