"""Scoring shards as independent jobs: each worker process builds the task from the params and scores its rows.

The worker needs a task of its own (a reader or detector loaded once per process), so this job lives
here, beside the task registry, rather than in :mod:`gdro_core.data.fanout`, which stays free of every
task; the Prefect task runner and :func:`~gdro_core.data.fanout.run_jobs` that spread the jobs are there.
``flows/score.py`` maps :func:`run_score_job` over a chunk of rows per job.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pandas as pd
import torch

from gdro_core.data.scoring import score_task_rollouts
from gdro_core.params import Params
from gdro_core.tasks.base import Task
from gdro_core.tasks.registry import make_task


@dataclass(frozen=True)
class ScoreJob:
    """One chunk of rollout rows and the params (as JSON) of the task that scores them."""

    rows: tuple[dict, ...]
    rollout_dir: str
    params_json: str
    threads: int


@lru_cache(maxsize=1)
def worker_task(params_json: str) -> Task:
    """The params' task (and so its reader or detector), built once per worker process."""
    return make_task(Params.model_validate_json(params_json))


def run_score_job(job: ScoreJob) -> pd.DataFrame:
    """Score one chunk of rows with this worker's task (the stage's own entry point, score_task_rollouts)."""
    torch.set_num_threads(job.threads)
    return score_task_rollouts(list(job.rows), Path(job.rollout_dir), worker_task(job.params_json))
