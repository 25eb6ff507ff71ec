"""Loads params once per flow run and resolves the project layout."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from gdro_core.layout import Layout
from gdro_core.params import load_params, round_params


STALE_RUNS_LIMIT = 200
"""Flow runs of this host checked per command (the newest first)."""


def project_root() -> Path:
    """The project root: ``GDRO_ROOT`` if set, else the working directory (where dvc runs stages)."""
    return Path(os.environ.get("GDRO_ROOT", Path.cwd())).resolve()


def load_layout(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None, round: int = 1) -> Layout:
    """The layout of ``round`` (1: the default pipeline) with the params that round runs with."""
    import torch

    from gdro_core.models import check_image_size
    from gdro_core.params import stage_threads

    root = project_root()
    path = Path(params_path)
    params = absolute_source(load_params(path if path.is_absolute() else root / path, overrides), root)
    check_image_size(params)  # the task's images must fit the model family (a ModelError naming the multiple)
    torch.set_num_threads(stage_threads(params.scale.threads))
    # no global seeding: every draw takes an explicit generator, so parallel sweep threads do not interleave
    return Layout(root=root, params=round_params(params, round), round=round)


def absolute_source(params, root: Path):
    """``model.source`` as an absolute path when it names a directory relative to the project root: what stages
    record for later (the base's ``source.json``, the adapter's ``base.json``, the registered model's params) then
    loads from any working directory. A hub id stays as it is."""
    source = params.model.source
    if source == "builtin" or Path(source).is_absolute() or not (root / source).exists():
        return params
    model = params.model.model_copy(update={"source": str((root / source).resolve())})
    return params.model_copy(update={"model": model})


def stage_flow(name: str):
    """The named stage's flow, ``<name>_flow`` of its first code module (``flows/<name>.py``; the import stage's is
    ``flows/import_manifest.py``), imported by name: a stage loads (and its code hash covers) only its own flow."""
    import importlib

    from gdro_core.stages import stage

    return getattr(importlib.import_module(stage(name).code[0]), f"{name}_flow")


PID_TAG, HOST_TAG = "gdro.pid:", "gdro.host:"


def run_tags() -> list[str]:
    """Tags a `gdro` command gives its flow runs: which process runs them, so a later command can tell a killed one."""
    return ["gdro", f"{PID_TAG}{os.getpid()}", f"{HOST_TAG}{socket.gethostname()}"]


def tag_flow_run() -> list[str]:
    """Give the running flow run this process's tags (:func:`run_tags`) if it lacks them: a run a deployment
    started (`gdro serve`) was created by the server, before any process ran it. Returns the tags added."""
    from prefect import get_client
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    run = ctx.flow_run if ctx is not None else None
    if run is None or any(t.startswith(PID_TAG) for t in run.tags):
        return []
    added = [t for t in run_tags() if t not in run.tags]
    with get_client(sync_client=True) as client:
        client.update_flow_run(run.id, tags=[*run.tags, *added])
    return added


def crash_orphaned_flow_runs(deployment_runs: bool = False, message: str = "") -> list[str]:
    """Flow runs left Running by a `gdro` process of this host that is gone (kill -9) end Crashed; with
    ``deployment_runs`` (`gdro serve` stopping its deployments) also deployment runs no process has tagged yet.

    Prefect marks a crash it sees; a killed process sees nothing, so the next command does it.
    """
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter, FlowRunFilterDeploymentId, FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.states import Crashed

    from gdro_core.tracking.locks import pid_alive

    crashed = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING])),
            tags=FlowRunFilterTags(all_=["gdro", f"{HOST_TAG}{socket.gethostname()}"]),
        ), sort=FlowRunSort.START_TIME_DESC, limit=STALE_RUNS_LIMIT)
        if deployment_runs:
            untagged = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING])),
                deployment_id=FlowRunFilterDeploymentId(is_null_=False),
            ), sort=FlowRunSort.START_TIME_DESC, limit=STALE_RUNS_LIMIT)
            runs += [r for r in untagged if not any(t.startswith(PID_TAG) for t in r.tags)]
        for run in runs:
            pids = [int(t.removeprefix(PID_TAG)) for t in run.tags if t.startswith(PID_TAG)]
            if pids and (pids[0] == os.getpid() or pid_alive(pids[0])):
                continue
            why = message or f"its process (pid {pids[0]}) was killed"
            client.set_flow_run_state(run.id, Crashed(message=why), force=True)
            crashed.append(str(run.id))
    return crashed
