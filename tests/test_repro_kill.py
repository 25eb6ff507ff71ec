"""kill -9 during rollout: no MLflow run or Prefect flow run is left Running, no lock is held, and the rerun
ends with the same bytes as an uninterrupted rollout."""

import subprocess
import sys
from pathlib import Path

import mlflow

from conftest import TINY, copy_project, gdro_env, in_project, kill_when, tiny_project
from flows.rollout import rollout_flow
from gdro_core.data.store import dir_hash

BIN = Path(sys.executable).parent


def test_kill_9_during_rollout_leaves_nothing_running_and_the_rerun_ends_with_the_same_bytes(tmp_path, prefect_server):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort

    # one prompt per shard and more sampler steps: a rollout long enough to be interrupted between shards
    params = {**TINY, "prompts": {**TINY["prompts"], "n_train": 16},
              "sampler": {**TINY["sampler"], "steps": 20, "batch_size": 4}}
    project = tiny_project(tmp_path / "killed", params)  # prompts and a small random base, made in this process
    env = gdro_env(project)
    twin = tmp_path / "uninterrupted"
    copy_project(project, twin)

    proc = subprocess.Popen([BIN / "gdro", "rollout"], cwd=project, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    kill_when(proc, (project / "data/rollouts/records/shard-0001.json").is_file, "the rollout")
    assert not (project / "data/rollouts/manifest.json").exists()

    rerun = subprocess.run([BIN / "gdro", "rollout"], cwd=project, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]  # the next `gdro` command: it also marks the killed run
    in_project(twin, rollout_flow)  # the same rollout never interrupted, in this process
    assert dir_hash(project / "data/rollouts") == dir_hash(twin / "data/rollouts")
    assert not list(project.glob(".gdro/locks/*.lock"))

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`gdro.stage` = 'rollout'")
    assert sorted(runs["status"]) == ["FINISHED", "KILLED"]  # the killed run is marked, not left RUNNING
    with get_client(sync_client=True) as client:
        killed = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"gdro.pid:{proc.pid}"])),
                                       sort=FlowRunSort.ID_DESC, limit=10)
    assert [r.state.type.value for r in killed] == ["CRASHED"]
