"""Rollout shards as independent jobs, and the Prefect task runner that spreads any jobs over workers.

A job carries everything its worker needs (plain, picklable values: the params as JSON), runs the same
library functions as the serial path (:func:`~gdro_core.data.rollout.write_shard`) and writes only its
own files, so any number of workers gives the same bytes as one process. Each worker process loads its
model once (an ``lru_cache`` per process) and reuses it for every job it is given. Scoring jobs need the
task, so they live with the task registry (:mod:`gdro_core.tasks.jobs`); this module imports no task.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from gdro_core.data.rollout import Shard, shard_is_valid, write_shard
from gdro_core.data.store import read_json
from gdro_core.params import Params, Scale

RUNNER_PACKAGES = {"dask": ("prefect_dask", "prefect-dask"), "ray": ("prefect_ray", "prefect-ray")}


class FanoutError(RuntimeError):
    """A task runner that cannot be started as configured; the message says what to install or set."""


@dataclass(frozen=True)
class RolloutJob:
    """One rollout shard and how to sample it: the model, the images per prompt and the sampler are the params'
    (``params_json``, the stage's params as :meth:`Params.model_dump_json` writes them)."""

    shard: Shard
    params_json: str
    base_dir: str
    out_dir: str
    fingerprint: str
    threads: int
    adapter_dir: str = ""  # a later round samples with the previous round's adapter applied; "" = the base


def worker_count(scale: Scale) -> int:
    """Workers for a cluster runner: as set, else one per visible GPU, else one."""
    if scale.workers:
        return scale.workers
    return torch.cuda.device_count() or 1


def worker_threads(scale: Scale, workers: int) -> int:
    """Torch threads per worker: as set, else the machine's cores shared evenly between the workers."""
    return scale.threads_per_worker or max(1, (os.cpu_count() or 1) // max(1, workers))


def worker_device(device: str) -> str:
    """The device of this worker: with several GPUs, a Dask LocalCluster worker takes the GPU of its index.

    Ray gives each task its own GPU (``num_gpus=1``), and workers started by hand on a cluster are
    given theirs through ``CUDA_VISIBLE_DEVICES``; both then see one GPU only.
    """
    from gdro_core.models.base import pick_device

    dev = pick_device(device)
    if dev.type != "cuda" or dev.index is not None or torch.cuda.device_count() < 2:
        return str(dev)
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):  # not inside a Dask worker
        return str(dev)
    return f"cuda:{int(name) % torch.cuda.device_count()}" if str(name).isdigit() else str(dev)


@lru_cache(maxsize=1)
def worker_model(params_json: str, base_dir: str, fingerprint: str, adapter_dir: str = ""):
    """The frozen base as the params describe it (with ``adapter_dir``'s adapter applied, if given), on this
    worker's device, loaded once per worker process (the fingerprint keys a changed base or adapter)."""
    from gdro_core.models import load_model

    params = Params.model_validate_json(params_json)
    model = load_model(params, base_dir, device=worker_device(params.model.device))
    if adapter_dir:
        model.load_adapter(Path(adapter_dir))
    return model


def run_rollout_job(job: RolloutJob) -> dict:
    """Sample one shard unless it already verifies (a retried job finds its work done); return its record."""
    torch.set_num_threads(job.threads)
    out = Path(job.out_dir)
    if shard_is_valid(out, job.shard, job.fingerprint):
        return read_json(out / job.shard.record)
    p = Params.model_validate_json(job.params_json)
    model = worker_model(job.params_json, job.base_dir, job.fingerprint, job.adapter_dir)
    return write_shard(model, job.shard, p.rollout.images_per_prompt, p.rollout_steps, p.sampler.guidance, out,
                       job.fingerprint)


def flow_api_url() -> str:
    """The Prefect API the running flow reports to: ``PREFECT_API_URL``, or else the temporary server Prefect started
    for this process ("" outside a flow, when neither is known)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url:
        return url
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None:
        return ""
    from prefect.client.orchestration import get_client

    return str(get_client(sync_client=True).api_url)  # the temporary server of this flow, already running


def worker_env(api_url: str) -> dict[str, str]:
    """What workers need in their environment to report task runs to the flow's Prefect server: without
    ``PREFECT_API_URL`` each worker process would start a temporary Prefect server of its own (~100 s each)."""
    return {"PREFECT_API_URL": api_url} if api_url else {}


def task_runner(scale: Scale, env: dict[str, str] | None = None):
    """The Prefect task runner ``scale`` names: a Dask or Ray one (local cluster, or the given address); the
    workers of a local cluster get ``env`` in their environment."""
    if scale.runner not in RUNNER_PACKAGES:
        raise FanoutError(f"scale.runner {scale.runner!r} runs in this process; it has no task runner")
    module, package = RUNNER_PACKAGES[scale.runner]
    try:
        __import__(module)
    except ImportError:
        raise FanoutError(
            f"scale.runner is {scale.runner!r} but {package} is not installed: `pip install -e '.[scale]'` "
            "(or set scale.runner: local)"
        ) from None
    workers = worker_count(scale)
    if scale.runner == "dask":
        from prefect_dask import DaskTaskRunner

        if scale.address:
            return DaskTaskRunner(address=scale.address)
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            # One single-threaded process per worker: one model per process, one shard at a time. Every
            # server on loopback; the dashboard on a free port, so that two clusters never collide.
            cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                            "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0", "env": dict(env or {})},
        )
    from prefect_ray import RayTaskRunner

    if scale.address:
        return RayTaskRunner(address=scale.address)
    return RayTaskRunner(
        init_kwargs={"num_cpus": workers, "num_gpus": torch.cuda.device_count(), "include_dashboard": False,
                     "_node_ip_address": "127.0.0.1", "runtime_env": {"env_vars": dict(env or {})}}
    )


def ray_task_options() -> dict:
    """Ray task options: one GPU per task when the cluster has GPUs (Ray then hides the others from it)."""
    import ray

    return {"num_gpus": 1} if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else {}


def run_jobs(scale: Scale, task, jobs: list, progress: Callable[[int, int], None] | None = None) -> list:
    """Submit the Prefect ``task`` once per job to the runner ``scale`` names; results in job order.

    The workers report their task runs to the flow's Prefect server (its URL goes with every submitted task and
    into a local cluster's environment), never to temporary servers of their own. Leaving the runner (also on
    SIGTERM or Ctrl-C) closes a local cluster and so ends its worker processes."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if not jobs:
        return []
    api_url = flow_api_url()
    settings = temporary_settings({PREFECT_API_URL: api_url}) if api_url else nullcontext()
    with task_runner(scale, worker_env(api_url)) as runner:
        options = nullcontext()
        if scale.runner == "ray":
            from prefect_ray.context import remote_options

            options = remote_options(**ray_task_options())
        with options, settings:  # submitted tasks carry the settings they run with
            futures = [runner.submit(task, parameters={"job": job}) for job in jobs]
        results = []
        for i, future in enumerate(futures, 1):
            results.append(future.result())
            if progress:
                progress(i, len(jobs))
    return results
