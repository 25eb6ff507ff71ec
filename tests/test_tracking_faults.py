"""Tracking never loses work: unreachable servers are named at start, failed metric logs are skipped,
runs of killed processes end KILLED (and training continues its own run), one writer per stage output."""

import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import pytest
from conftest import TINY, copy_project, in_project, kill_when, scored_copy
from flows.train import train_flow

from gdro_core.params import parse_params
from gdro_core.tracking.locks import LockError, lock_path, stage_lock
from gdro_core.tracking.runs import PID_TAG, TrackingError, configure, metric_logger, stage_run

BIN = Path(sys.executable).parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_tracking_server_is_named_at_once(tmp_path):
    params = parse_params({**TINY, "tracking": {"uri": f"http://127.0.0.1:{free_port()}", "connect_timeout": 2}})
    start = time.monotonic()
    with pytest.raises(TrackingError, match=r"not reachable .*gdro serve.*sqlite:///mlflow.db"):
        configure(params, tmp_path)
    assert time.monotonic() - start < 30  # before: minutes of silent retries


def test_a_failed_metric_log_is_counted_and_training_goes_on(monkeypatch, caplog):
    def down(*args, **kwargs):
        raise mlflow.exceptions.MlflowException("connection refused")

    monkeypatch.setattr(mlflow, "log_metrics", down)
    log = metric_logger(pause=0.0)
    log(1, {"loss": 1.0})
    log(2, {"loss": 0.5})
    assert log.failures["count"] == 2
    assert "training goes on" in caplog.text


def test_a_run_left_running_by_a_dead_process_ends_killed_and_its_training_continues_it(tmp_path):
    params = parse_params(TINY)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    exp = configure(params, tmp_path)
    with mlflow.start_run(experiment_id=exp, tags={PID_TAG: str(dead.pid), "gdro.host": os.uname().nodename,
                                                    "gdro.resume_key": "abc", "gdro.stage": "train"}) as run:
        stale_id = run.info.run_id
    mlflow.MlflowClient().update_run(stale_id, "RUNNING")  # as a kill -9 leaves it
    with stage_run(params, tmp_path, "train", ("train",), resume_key="abc") as resumed:
        assert resumed.info.run_id == stale_id  # one training, one run: the curve is not split
    assert mlflow.MlflowClient().get_run(stale_id).info.status == "FINISHED"
    with stage_run(params, tmp_path, "train", ("train",), resume_key="abc") as fresh:
        assert fresh.info.run_id != stale_id  # a finished training is never continued


HOLDER = """
import sys, time
from gdro_core.tracking.locks import stage_lock
with stage_lock(sys.argv[1], "train", {"paths.adapter_dir": "models/adapter"}):
    print("held", flush=True)
    time.sleep(120)
"""


def test_one_writer_per_stage_output_and_a_dead_owner_is_taken_over(tmp_path, caplog):
    outputs = {"paths.adapter_dir": "models/adapter"}
    other = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        with pytest.raises(LockError, match=f"pid {other.pid}.*wait for it"):
            with stage_lock(tmp_path, "train", outputs):
                pass
    finally:
        other.kill()  # as kill -9 does: no cleanup, the lock file stays behind
        other.wait()
    path = lock_path(tmp_path, "train", outputs)
    assert json.loads(path.read_text())["pid"] == other.pid
    with stage_lock(tmp_path, "train", outputs) as held:  # its owner is dead now
        assert json.loads(held.read_text())["pid"] == os.getpid()
        with stage_lock(tmp_path, "train", outputs):  # nested in one process: re-entrant
            pass
        assert held.exists()
    assert f"pid {other.pid}" in caplog.text and "taking over" in caplog.text
    assert not path.exists()
    with stage_lock(tmp_path, "train", {"paths.adapter_dir": "models/sweeps/a"}):
        with stage_lock(tmp_path, "train", outputs):  # other outputs: another lock
            pass


def test_two_runs_started_at_once_never_both_hold_the_lock(tmp_path):
    """Many processes racing for one lock (a stale one left by a killed run among them): exactly one wins."""
    path = lock_path(tmp_path, "train", {"paths.adapter_dir": "models/adapter"})
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"pid": 999999999, "host": os.uname().nodename}))  # left by a killed run
    racer = """
import sys, time
from gdro_core.tracking.locks import LockError, stage_lock
time.sleep(float(sys.argv[2]) - time.time())
try:
    with stage_lock(sys.argv[1], "train", {"paths.adapter_dir": "models/adapter"}):
        print("won", flush=True)
        time.sleep(3)
except LockError:
    print("refused", flush=True)
"""
    go = str(time.time() + 3)
    procs = [subprocess.Popen([sys.executable, "-c", racer, str(tmp_path), go], stdout=subprocess.PIPE, text=True)
             for _ in range(6)]
    results = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert results == ["refused"] * 5 + ["won"]


@pytest.fixture()
def scored_project(scored, tmp_path):
    params = {**TINY, "train": {**TINY["train"], "steps": 24, "checkpoint_every": 2},
              "evaluate": {**TINY["evaluate"], "checkpoint_every": 8}}
    return tmp_path / "project", scored_copy(scored, tmp_path / "project", params)


def test_kill_9_during_train_leaves_nothing_running_and_the_rerun_ends_with_the_same_bytes(scored_project):
    path, env = scored_project
    twin = path.parent / "uninterrupted"
    copy_project(path, twin)

    proc = subprocess.Popen([BIN / "gdro", "train"], cwd=path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    kill_when(proc, lambda: bool(list(path.glob("checkpoints/train/*/step-0000004"))), "training", poll=0.2)
    assert list(path.glob(".gdro/locks/*.lock")), "the killed run's lock is left behind, to be taken over"

    rerun = subprocess.run([BIN / "gdro", "train"], cwd=path, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]  # the next `gdro` command: it also marks the killed run
    in_project(twin, train_flow)  # the same training never interrupted, in this process
    weights = "models/adapter/pytorch_lora_weights.safetensors"
    assert (path / weights).read_bytes() == (twin / weights).read_bytes()
    assert not list(path.glob(".gdro/locks/*.lock"))
    mlflow.set_tracking_uri(f"sqlite:///{path / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`gdro.stage` = 'train'")
    assert list(runs["status"]) == ["FINISHED"]  # the killed run was continued, not duplicated
    assert not (mlflow.search_runs(search_all_experiments=True)["status"] == "RUNNING").any()
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:  # the Prefect flow run of the killed command is not left Running
        killed = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"gdro.pid:{proc.pid}"])),
                                        sort=FlowRunSort.ID_DESC, limit=10)
    assert [r.state.type.value for r in killed] == ["CRASHED"]


def test_a_temporary_server_orphaned_by_a_killed_command_is_stopped_and_others_are_left_alone():
    import psutil

    from gdro_core.servers import OWNER_ENV, mark_owner, reap_orphaned_temporary_servers

    # A mark of this test's own: every gdro command reaps orphans of the real mark, and tests run side by side.
    mark = f"gdro-test-temporary-server-{uuid.uuid4().hex}"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = {}
    mark_owner(me)
    pid, started = me[OWNER_ENV].split(":")
    assert int(pid) == os.getpid() and abs(float(started) - psutil.Process().create_time()) < 1e-2
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)", mark]
    orphan = subprocess.Popen(sleeper, env={**os.environ, OWNER_ENV: f"{dead.pid}:1.0"})
    # A live pid with another start time: the owner died and its pid went to an unrelated process.
    reused = subprocess.Popen(sleeper, env={**os.environ, OWNER_ENV: f"{os.getpid()}:1.0"})
    owned = subprocess.Popen(sleeper, env={**os.environ, **me})
    legacy = subprocess.Popen(sleeper, env={**os.environ, OWNER_ENV: str(os.getpid())})  # pid only: still read
    try:
        time.sleep(0.5)
        assert sorted(reap_orphaned_temporary_servers(mark)) == sorted([orphan.pid, reused.pid])
        assert orphan.wait(timeout=10) is not None and reused.wait(timeout=10) is not None
        assert owned.poll() is None and legacy.poll() is None  # their owner (this test) is alive
    finally:
        for p in (orphan, reused, owned, legacy):
            p.kill()
            p.wait()


def test_a_resumed_run_that_finishes_sets_the_failed_attempts_error_aside(tmp_path):
    from gdro_core.tracking.runs import PREVIOUS_ERROR_TAG

    params = parse_params(TINY)
    with pytest.raises(RuntimeError, match="disk on fire"):
        with stage_run(params, tmp_path, "train", ("train",), resume_key="k1") as failed:
            raise RuntimeError("disk on fire")
    client = mlflow.MlflowClient()
    assert client.get_run(failed.info.run_id).info.status == "FAILED"
    assert [f.path for f in client.list_artifacts(failed.info.run_id)] == ["error.txt"]
    with stage_run(params, tmp_path, "train", ("train",), resume_key="k1") as resumed:
        assert resumed.info.run_id == failed.info.run_id
    run = client.get_run(failed.info.run_id)
    assert run.info.status == "FINISHED" and client.list_artifacts(run.info.run_id) == []
    assert "disk on fire" in run.data.tags[PREVIOUS_ERROR_TAG]


def test_a_copied_or_moved_workspace_writes_its_artifacts_into_its_own_mlartifacts(tmp_path, caplog):
    import shutil

    params = parse_params(TINY)
    original, copy, moved = tmp_path / "original", tmp_path / "copy", tmp_path / "moved"
    with stage_run(params, original, "train", ("train",)) as run:
        mlflow.log_text("first", "notes.txt")
    first = run.info.run_id
    shutil.copytree(original, copy)  # cp -r: mlflow.db still names original/mlartifacts
    with stage_run(params, copy, "train", ("train",)) as run:
        mlflow.log_text("second", "notes.txt")
    assert (copy / "mlartifacts" / run.info.run_id / "artifacts" / "notes.txt").read_text() == "second"
    assert not (original / "mlartifacts" / run.info.run_id).exists()  # the original is left alone
    assert "copied or moved from" in caplog.text and str(original) in caplog.text
    client = mlflow.MlflowClient()
    assert client.get_run(first).info.artifact_uri == (copy / "mlartifacts" / first / "artifacts").as_uri()
    assert client.get_experiment_by_name("gdro").artifact_location == (copy / "mlartifacts").as_uri()

    shutil.copytree(original, moved)  # moved without its artifact folder: older runs keep the original's files
    shutil.rmtree(moved / "mlartifacts")
    with stage_run(params, moved, "train", ("train",)) as run:
        mlflow.log_text("third", "notes.txt")
    assert (moved / "mlartifacts" / run.info.run_id / "artifacts" / "notes.txt").read_text() == "third"
    in_moved = mlflow.MlflowClient()  # the moved project's store
    assert in_moved.get_run(first).info.artifact_uri == (original / "mlartifacts" / first / "artifacts").as_uri()
    assert "1 left in" in caplog.text

    with sqlite3.connect(moved / "mlflow.db") as con:  # a location the original cannot be told from: say how
        con.execute("UPDATE experiments SET artifact_location = ? WHERE name = 'gdro'",
                    ((tmp_path / "elsewhere").as_uri(),))
    with pytest.raises(TrackingError, match=r"outside this project .*set tracking.experiment to a new name"):
        configure(params, moved)
