"""Prefect deployments of the `pipeline` and `sweep` flows, with the cron schedules kept in params.yaml.

`gdro deploy` (started by `gdro serve` unless ``serve.deployments`` is false) registers them with the
running Prefect server and executes their runs, whether started from the Prefect UI, by
``prefect deployment run pipeline/gdro``, by ``run_deployment`` or by a schedule
(``serve.pipeline_cron`` / ``serve.sweep_cron``). Runs execute in the project root.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron, Schedule

from flows.context import project_root
from flows.pipeline import pipeline_flow
from flows.sweep import sweep_flow
from gdro_core.params import Params, ParamsError, load_params
from gdro_core.servers import ServeError, healthy

DEPLOYMENT = "gdro"


def schedules(cron: str, timezone: str, key: str) -> list[Schedule]:
    """``[]`` for an empty cron string, else one cron schedule; a bad one is an error naming ``serve.<key>``."""
    if not cron.strip():
        return []
    try:
        return [Cron(cron, timezone=timezone)]
    except ValueError as err:
        raise ParamsError(
            f"'serve.{key}' = {cron!r} in time zone {timezone!r} is not a valid schedule ({err}): use five fields, "
            "minute hour day-of-month month day-of-week (e.g. \"0 3 * * *\"), or \"\" for none"
        ) from None


def build_deployments(
    params: Params, params_path: str, overrides: dict[str, Any] | None = None,
) -> list[RunnerDeployment]:
    """The pipeline and sweep deployments (named ``gdro``), parameterised by the params file they read."""
    s = params.serve
    common: dict[str, Any] = {
        "parameters": {"params_path": params_path, "overrides": overrides or {}},
        "tags": ["gdro"],
        "entrypoint_type": EntrypointType.MODULE_PATH,
    }
    pipeline_schedules = schedules(s.pipeline_cron, s.timezone, "pipeline_cron")
    sweep_schedules = schedules(s.sweep_cron, s.timezone, "sweep_cron")
    return [
        pipeline_flow.to_deployment(
            DEPLOYMENT, schedules=pipeline_schedules, paused=False if pipeline_schedules else None,
            description="All six stages (prompts, base, rollout, score, train, evaluate) as one flow run.", **common,
        ),
        sweep_flow.to_deployment(
            DEPLOYMENT, schedules=sweep_schedules, paused=False if sweep_schedules else None,
            description="Train + evaluate per config of params.yaml's sweep section (or the grid given here) "
                        "on the cached rollouts and reward table.", **common,
        ),
    ]


def serve_deployments(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None) -> None:
    """Register the deployments with the Prefect server at PREFECT_API_URL and run their flow runs until stopped."""
    from prefect import serve
    from prefect.settings import PREFECT_API_URL

    root = project_root()
    os.environ["GDRO_ROOT"] = str(root)  # flow runs start as child processes; they work in this project
    params = load_params(root / params_path if not Path(params_path).is_absolute() else params_path, overrides)
    url = PREFECT_API_URL.value()
    if not url or not healthy(f"{url}/health", timeout=5.0):
        raise ServeError(
            f"no Prefect server answers at {url or '(PREFECT_API_URL is not set)'}: deployments need one; "
            "`gdro serve` (or `make ui`) starts one and serves the deployments too"
        )
    deployments = build_deployments(params, params_path, overrides)
    serve(*deployments, limit=params.serve.concurrent_runs)
