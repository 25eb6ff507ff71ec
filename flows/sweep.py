"""Flow `sweep`: train + evaluate per config on the cached rollouts and reward table.

Each config runs the real `train` and `evaluate` flows (as subflows of one Prefect task) with its own
adapter and reports directories; configs run through a thread-pool task runner, ``sweep.max_workers``
at a time. In MLflow the sweep is a parent run, each config a child run of it, and each config's
train and evaluate runs children of the config's run. Rollouts and rewards are never regenerated
unless the params they depend on changed since they were made.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.entities import Metric, Param
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from prefect import flow, get_run_logger, tags, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.context import load_layout, project_root, run_tags, tag_flow_run
from flows.evaluate import evaluate_flow
from flows.rollout import rollout_flow
from flows.score import score_flow
from flows.train import train_flow
from gdro_core.evaluation.base_vs_trained import flat_metrics
from gdro_core.tracking.compare import set_champion
from gdro_core.tracking.data_version import data_version
from gdro_core.params import load_params
from gdro_core.servers import tool
from gdro_core.data.store import atomic_write, write_json
from gdro_core.cache_keys import stale_stages
from gdro_core.sweep import (
    SweepConfig, SweepError, check_configs, config_overrides, dotted_defaults, dotted_keys, dvc_exp_commands,
    resolve_sweep, results_frame, sweep_configs,
)
from gdro_core.tracking.runs import HOST_TAG, PID_TAG, stage_run, stopped


def _run_adopted(client: mlflow.MlflowClient, parent_run_id: str, fn):
    """Run a flow whose stage run starts at the top level in this thread, then nest that run under ``parent_run_id``."""
    before = mlflow.last_active_run()
    try:
        return fn()
    finally:
        last = mlflow.last_active_run()
        if last is not None and (before is None or last.info.run_id != before.info.run_id):
            client.set_tag(last.info.run_id, MLFLOW_PARENT_RUN_ID, parent_run_id)


@task(cache_policy=NO_CACHE)
def remake_data(params_path: str, overrides: dict[str, Any], stages: list[str], parent_run_id: str) -> None:
    """Rerun the rollout and/or score flows (or the import flow) (in a worker thread, so their runs can nest under the sweep's)."""
    client = mlflow.MlflowClient()
    if "import" in stages:
        from flows.import_manifest import import_flow

        _run_adopted(client, parent_run_id, lambda: import_flow(params_path=params_path, overrides=overrides))
        return
    if "rollout" in stages:
        _run_adopted(client, parent_run_id, lambda: rollout_flow(params_path=params_path, overrides=overrides))
    _run_adopted(client, parent_run_id, lambda: score_flow(params_path=params_path, overrides=overrides))


@task(cache_policy=NO_CACHE, task_run_name="config {label}")
def run_config(
    params_path: str, overrides: dict[str, Any], label: str, values: dict[str, Any], sweep_name: str,
    experiment_id: str, parent_run_id: str,
) -> dict:
    """Train and evaluate one config as subflows, inside its own MLflow run (a child of the sweep's)."""
    logger = get_run_logger()
    client = mlflow.MlflowClient()
    run = client.create_run(experiment_id, tags={
        MLFLOW_PARENT_RUN_ID: parent_run_id, MLFLOW_RUN_NAME: label, "gdro.stage": "sweep-config",
        "gdro.sweep": sweep_name, "gdro.config": label,
        PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname(),  # a killed sweep's run is marked KILLED later
    })
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in {**values, **overrides}.items()])
    try:
        logger.info("config %s: training with %s", label, values)
        _run_adopted(client, run_id, lambda: train_flow(params_path=params_path, overrides=overrides))
        logger.info("config %s: evaluating", label)
        metrics = _run_adopted(client, run_id, lambda: evaluate_flow(params_path=params_path, overrides=overrides))
        evaluate_run = mlflow.last_active_run()
        flat = flat_metrics(metrics)
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in flat.items()])
        versions = client.search_model_versions(f"run_id='{evaluate_run.info.run_id}'") if evaluate_run else []
        version = max((int(v.version) for v in versions), default=None)
        if version is not None:
            client.set_tag(run_id, "gdro.registered_version", str(version))
        client.set_terminated(run_id, "FINISHED")
    except BaseException as err:
        client.log_text(run_id, traceback.format_exc(), "error.txt")
        client.set_terminated(run_id, "KILLED" if stopped(err) else "FAILED")
        raise
    logger.info("config %s: trained reward %.4g, corrected %.4g", label, flat.get("trained.reward", float("nan")),
                flat.get("trained.corrected", float("nan")))
    return {"label": label, "values": values, "metrics": flat, "version": version, "run_id": run_id,
            "adapter_dir": overrides["paths.adapter_dir"], "reports_dir": overrides["paths.reports_dir"]}


def check_sweep(params_path: str, overrides: dict[str, Any] | None, grid: dict[str, list[Any]] | None,
                name: str | None, max_workers: int | None) -> None:
    """The sweep's configs validated before its flow (and a Prefect server) starts, so that a misspelt key or a bad
    value is one line, not a flow run's traceback; the flow checks them again for a run started from the UI."""
    params = load_params(project_root() / params_path, overrides)
    check_configs(params, sweep_configs(resolve_sweep(params.sweep, grid, None, name, max_workers)))


@flow(name="sweep")
def sweep_flow(
    params_path: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    grid: dict[str, list[Any]] | None = None,
    configs: list[dict[str, Any]] | None = None,
    name: str | None = None,
    max_workers: int | None = None,
) -> list[dict]:
    """Train + evaluate every config of ``grid`` / ``configs`` (default: params.yaml's ``sweep`` section)."""
    tag_flow_run()  # a deployment's run: tagged with its process, as its subflows are, for a later command to check
    lay = load_layout(params_path, overrides)
    p = lay.params
    logger = get_run_logger()
    with tags(*run_tags()), stage_run(p, lay.root, "sweep", ("train", "evaluate", "judge")) as parent:
        spec = resolve_sweep(p.sweep, grid, configs, name, max_workers)
        todo: list[SweepConfig] = sweep_configs(spec)
        mlflow.set_tags({"gdro.sweep": spec.name})
        mlflow.log_params({"sweep.name": spec.name, "sweep.configs": len(todo), "sweep.max_workers": spec.max_workers})
        mlflow.log_dict(spec.model_dump(), "sweep.json")
        check_configs(p, todo)
        stale = stale_stages(lay)
        experiment_id, parent_id = parent.info.experiment_id, parent.info.run_id
        results, failures = [], []
        with ThreadPoolTaskRunner(max_workers=spec.max_workers) as runner:
            if stale:
                logger.warning("cached data out of date with the params: remaking %s", " and ".join(stale))
                runner.submit(remake_data, parameters={
                    "params_path": params_path, "overrides": overrides or {}, "stages": stale,
                    "parent_run_id": parent_id,
                }).result()
            mlflow.set_tags(data_version(lay))
            logger.info("sweep %s: %d configs, %d at a time", spec.name, len(todo), spec.max_workers)
            futures = [
                runner.submit(run_config, parameters={
                    "params_path": params_path, "overrides": config_overrides(p, spec.name, c, overrides),
                    "label": c.label, "values": c.values, "sweep_name": spec.name,
                    "experiment_id": experiment_id, "parent_run_id": parent_id,
                })
                for c in todo
            ]
            for i, (c, future) in enumerate(zip(todo, futures, strict=True), 1):
                try:
                    results.append(future.result())
                    logger.info("sweep %s: %d/%d configs done (%s)", spec.name, i, len(todo), c.label)
                except Exception as err:  # noqa: BLE001 - every config is reported, then the sweep fails
                    failures.append(f"{c.label}: {type(err).__name__}: {err}")
                    logger.error("sweep %s: config %s failed: %s", spec.name, c.label, err)
        frame, metric = results_frame(results, p.registry.rank_by)
        out_dir = lay.reports_dir / "sweeps" / spec.name
        atomic_write(out_dir / "results.csv", lambda f: frame.to_csv(f, index=False))
        write_json(out_dir / "results.json", {"rank_by": metric, "results": results, "failed": failures})
        mlflow.log_artifact(str(out_dir / "results.csv"))
        if metric is not None and not frame.empty:
            mlflow.log_metrics({f"best.{metric}": float(frame[metric].iloc[0]), "configs_done": len(results)})
            mlflow.set_tag("gdro.best_config", str(frame["label"].iloc[0]))
            logger.info("sweep %s: best config %s (%s %.4g)", spec.name, frame["label"].iloc[0], metric,
                        frame[metric].iloc[0])
        if p.tracking.registered_model and results:
            best, by = set_champion(mlflow.MlflowClient(), p.tracking.registered_model, p.registry.rank_by,
                                    p.registry.alias)
            logger.info("%s is version %s of %s (by %s)", p.registry.alias, best, p.tracking.registered_model, by)
        if failures:
            raise SweepError(f"{len(failures)} of {len(todo)} configs failed: " + "; ".join(failures))
        return results


def run_dvc_experiments(
    params_path: str = "params.yaml", overrides: dict[str, Any] | None = None,
    grid: dict[str, list[Any]] | None = None, name: str | None = None,
) -> int:
    """The same sweep as DVC experiments: ``dvc exp run -n <sweep>-<config> -S ...`` per config, in the workspace.

    DVC restores the cached rollouts and reward table and reruns only train and evaluate; ``dvc exp show``
    lists the experiments. Returns the first failing command's exit code, else 0.
    """
    root = project_root()
    if overrides:
        raise SweepError("--set does not apply to DVC experiments (they read params.yaml): put the values in "
                         "params.yaml or sweep them with --grid")
    if Path(params_path) != Path("params.yaml"):
        raise SweepError("DVC experiments read params.yaml (dvc.yaml's params file): run without --params")
    if not (root / ".dvc").is_dir():
        raise SweepError(f"{root} is not a DVC project: run `git init && dvc init` there, or sweep without --dvc")
    params = load_params(root / params_path)
    spec = resolve_sweep(params.sweep, grid, None, name)
    todo = sweep_configs(spec)
    check_configs(params, todo)
    keys = list(dict.fromkeys(k for c in todo for k in c.values))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    in_file = dotted_keys(yaml.safe_load((root / params_path).read_text()) or {})
    for i, cmd in enumerate(dvc_exp_commands(todo, spec.name, dotted_defaults(params, keys), in_file), 1):
        print(f"[{i}/{len(todo)}] $ {shlex.join(cmd)}", flush=True)
        code = subprocess.run([*tool("dvc"), *cmd[1:]], cwd=root, env=env, check=False).returncode
        if code:
            return code
    print(f"{len(todo)} DVC experiments done: `dvc exp show` lists them; the workspace holds the last one (DVC "
          f"rewrote params.yaml with its values, in its own YAML style), `dvc exp apply {spec.name}-<config>` brings "
          "back another, and `git checkout params.yaml dvc.lock && dvc checkout` the committed one", flush=True)
    return 0
