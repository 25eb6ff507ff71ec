"""A stage stops within seconds of SIGTERM, also when the signal reaches only `dvc repro` (which exits without
passing it on): the MLflow run ends KILLED, the last checkpoint (or finished rollout shard) is kept, and the next
run resumes from it."""

import logging
import logging.handlers
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import yaml

from conftest import TINY, dvc_copy, gdro_env, in_project, scored_copy, tiny_project
from flows.rollout import rollout_flow
from flows.train import train_flow
from gdro_core.params import parse_params
from gdro_core.tracking.runs import PENDING_DIR

BIN = Path(sys.executable).parent
STOP_WITHIN = 30.0  # seconds from SIGTERM to the stage's process being gone: the grace a scheduler gives before its
# SIGKILL (Kubernetes' terminationGracePeriodSeconds and Slurm's KillWait both default to 30 s). On a loaded two-core
# machine, reporting the crash to the temporary Prefect server and stopping it once took longer than 15 s.
PRETRAIN_STEPS = 600  # about 10 s of the tiny model: still running when the stop arrives after its first checkpoint
PRETRAIN_CHECKPOINT = 25  # (at 150 steps, about 2 s, a slow stop could find pretraining finished); short on rerun


def wait_for(ready, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout:.0f} s"
        time.sleep(0.1)


def gone_within(proc: psutil.Process, seconds: float) -> None:
    """Wait until ``proc`` has exited; a zombie has (reaping it is its parent's job, DVC's). Kill it and fail when it
    still runs after ``seconds``."""
    def exited() -> bool:
        try:
            return proc.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    deadline = time.monotonic() + seconds
    while not exited():
        if time.monotonic() >= deadline:
            command = " ".join(proc.cmdline())
            proc.kill()
            raise AssertionError(f"{command} still ran {seconds:.0f} s after SIGTERM")
        time.sleep(0.1)


def sigterm_when(stage: str, root: Path, env: dict, ready, what: str) -> tuple[int, Path, int]:
    """`gdro <stage>` in ``root``, sent SIGTERM once ``ready()``; its exit code (it must be gone within
    :data:`STOP_WITHIN`), its log and its pid."""
    log = root / f"{stage}.log"
    with log.open("w") as out:
        proc = subprocess.Popen([BIN / "gdro", stage], cwd=root, env={**env, "OMP_NUM_THREADS": "1"}, stdout=out,
                                stderr=subprocess.STDOUT)
        wait_for(ready, what)
        assert proc.poll() is None, log.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=STOP_WITHIN), log, proc.pid
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"gdro {stage} still ran {STOP_WITHIN:.0f} s after SIGTERM") from None


def run_logs(call) -> list[str]:
    """``call()`` in this process; what its flow and task run loggers said, whatever Prefect's logging config
    propagates."""
    heard = logging.handlers.BufferingHandler(10_000)
    said = {name: logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")}
    levels = {name: logger.level for name, logger in said.items()}
    for logger in said.values():
        logger.addHandler(heard)
        logger.setLevel(logging.INFO)
    try:
        call()
    finally:
        for name, logger in said.items():
            logger.removeHandler(heard)
            logger.setLevel(levels[name])
    return [r.getMessage() for r in heard.buffer]


def stage_runs(root: Path, stage: str):
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`gdro.stage` = '{stage}'",
                              order_by=["attributes.start_time ASC"])


def runs(root: Path, stage: str) -> list[str]:
    """The statuses of ``stage``'s MLflow runs, oldest first."""
    return list(stage_runs(root, stage)["status"])


def run_ids(root: Path, stage: str) -> list[str]:
    return list(stage_runs(root, stage)["run_id"])


def why(root: Path, log: Path) -> str:
    """What a failed status assertion shows: the stage's last output and any run end left for the next stage."""
    pending = [m.read_text() for m in sorted((root / PENDING_DIR).glob("*.json"))]
    return f"pending run ends: {pending}\n{log.read_text()[-4000:]}"


def logged_steps(log: str) -> list[int]:
    return [int(m) for m in re.findall(r"step (\d+):", log)]


def test_sigterm_to_dvc_repro_stops_pretraining_and_the_rerun_resumes(reproduced, tmp_path):
    # the reproduced project with a long pretraining: `dvc repro base` reruns check and base (the prompts are kept)
    project, env = dvc_copy(reproduced, tmp_path / "project")
    (project / "mlflow.db").unlink()  # the first repro's runs and checkpoints: this test counts and finds its own
    shutil.rmtree(project / "checkpoints")
    params = parse_params({**TINY, "pretrain": {**TINY["pretrain"], "steps": PRETRAIN_STEPS,
                                                "checkpoint_every": PRETRAIN_CHECKPOINT, "log_every": 1}})
    (project / "params.yaml").write_text(yaml.safe_dump(params.model_dump()))
    env = {**env, "OMP_NUM_THREADS": "1",
           "SHELL": "/bin/sh"}  # DVC runs the stage through $SHELL; a POSIX sh (dash) stays alive between them
    # the output goes to a file: a pipe nobody reads fills up, and a stage blocked writing its log cannot stop
    with (tmp_path / "repro.log").open("w") as out:
        repro = subprocess.Popen([BIN / "dvc", "repro", "base"], cwd=project, env=env, stdout=out,
                                 stderr=subprocess.STDOUT, text=True)
        wait_for(lambda: any((project / "checkpoints" / "base").glob("*/step-*")), "the first pretraining checkpoint")
        stage = next(p for p in psutil.Process(repro.pid).children(recursive=True)
                     if any(Path(arg).name == "gdro" for arg in p.cmdline()[:2]))  # the stage, not the shell around it
        repro.send_signal(signal.SIGTERM)
        repro.wait(timeout=60)
        gone_within(stage, STOP_WITHIN)
    assert runs(project, "base") == ["KILLED"], why(project, tmp_path / "repro.log")
    kept = sorted((project / "checkpoints" / "base").glob("*/step-*"))
    assert kept, "the last checkpoint was not kept"
    last = int(kept[-1].name.split("-")[1])
    assert last < PRETRAIN_STEPS

    again = subprocess.run([BIN / "dvc", "repro", "base"], cwd=project, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    steps = logged_steps(again.stdout + again.stderr)
    assert steps and steps[0] > last and steps[-1] == PRETRAIN_STEPS, (last, steps[:3], steps[-1:])  # resumed, not restarted
    assert f"resuming from {kept[-1].name}" in again.stdout + again.stderr
    assert runs(project, "base") == ["KILLED", "FINISHED"]


def test_sigterm_stops_training_marks_the_run_killed_and_the_rerun_resumes(scored, tmp_path):
    params = {**TINY, "train": {**TINY["train"], "steps": 120, "checkpoint_every": 5, "log_every": 1},
              "evaluate": {**TINY["evaluate"], "checkpoint_every": 0}}
    tmp_path = tmp_path / "project"
    env = scored_copy(scored, tmp_path, params)
    checkpoints = tmp_path / "checkpoints" / "train"
    code, log, _ = sigterm_when("train", tmp_path, env, lambda: any(checkpoints.glob("*/step-*")),
                                "the first training checkpoint")
    assert code != 0, log.read_text()[-3000:]  # never an exit 0 that DVC or a scheduler would take as done
    assert runs(tmp_path, "train") == ["KILLED"], why(tmp_path, log)
    kept = sorted(checkpoints.glob("*/step-*"))
    last = int(kept[-1].name.split("-")[1])
    rerun_ms = time.time() * 1000
    # the rerun, in this process: it continues the killed run in MLflow
    said = run_logs(lambda: in_project(tmp_path, train_flow))
    assert any(f"resuming from {kept[-1].name}" in m for m in said)  # said before its first step
    assert runs(tmp_path, "train")[-1] == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(run_ids(tmp_path, "train")[-1], "train/loss")
    steps = [m.step for m in sorted(history, key=lambda m: m.timestamp) if m.timestamp >= rerun_ms]
    assert steps and steps[0] > last and steps[-1] == 120, (last, steps[:3], steps[-1:])  # resumed, not restarted


def test_sigterm_stops_rollout_keeps_finished_shards_and_the_rerun_reuses_them(tmp_path, prefect_server):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort

    # one prompt per shard and more sampler steps: a rollout long enough to be stopped between shards
    params = {**TINY, "prompts": {**TINY["prompts"], "n_train": 16},
              "sampler": {**TINY["sampler"], "steps": 20, "batch_size": 4}}
    tiny_project(tmp_path, params)  # prompts and a small random base, made in this process
    env = gdro_env(tmp_path)
    records = tmp_path / "data" / "rollouts" / "records"
    code, log, pid = sigterm_when("rollout", tmp_path, env, (records / "shard-0001.json").is_file,
                                  "the second rollout shard")
    assert code != 0, log.read_text()[-3000:]
    assert runs(tmp_path, "rollout") == ["KILLED"], why(tmp_path, log)
    assert not (tmp_path / "data" / "rollouts" / "manifest.json").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in records.glob("shard-*.json")}
    assert "shard-0000.json" in kept and len(kept) < 16, sorted(kept)
    with get_client(sync_client=True) as client:
        stopped = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"gdro.pid:{pid}"])),
            sort=FlowRunSort.ID_DESC, limit=10)
    assert [r.state.type.value for r in stopped] in (["CRASHED"], ["CANCELLED"]), [r.state for r in stopped]

    said = run_logs(lambda: in_project(tmp_path, rollout_flow))  # the rerun, in this process
    assert runs(tmp_path, "rollout") == ["KILLED", "FINISHED"]
    left = 16 - len(kept)  # its progress counts the shards it samples, not the ones it reuses
    progress = [m for m in said if m.startswith("rollout shard")]
    assert progress == [f"rollout shard {i}/{left}" for i in range(1, left + 1)], progress
    assert {n: (records / n).stat().st_mtime_ns for n in kept} == kept  # the kept shards were reused, not redone
    assert len(list(records.glob("shard-*.json"))) == 16


def test_ctrl_c_to_the_whole_process_group_stops_a_stage_on_its_own_temporary_server(scored, tmp_path):
    """A terminal's Ctrl-C reaches the whole foreground process group: the stage and the temporary Prefect server it
    started. With its server gone, Prefect retried its crash report, then its log and event queues, for minutes at
    exit. The stage now exits on its own within a bounded time, with the run KILLED and the checkpoint kept."""
    from flows.cli import STOP_GRACE_S, STOPPED_EXIT

    params = {**TINY, "train": {**TINY["train"], "steps": 400, "checkpoint_every": 5, "log_every": 1},
              "evaluate": {**TINY["evaluate"], "checkpoint_every": 0}}
    tmp_path = tmp_path / "project"
    env = scored_copy(scored, tmp_path, params)
    env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}  # no server to attach to: the stage starts its own
    env.update(OMP_NUM_THREADS="1", PREFECT_HOME=str(tmp_path / ".prefect"))
    log = tmp_path / "train.log"

    def own_group_with_ctrl_c() -> None:  # a terminal's foreground group; pytest-xdist workers ignore SIGINT
        os.setsid()
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    with log.open("w") as out:
        proc = subprocess.Popen([BIN / "gdro", "train"], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=own_group_with_ctrl_c)
        wait_for(lambda: any((tmp_path / "checkpoints" / "train").glob("*/step-*")), "the first training checkpoint")
        server = [p for p in psutil.Process(proc.pid).children(recursive=True) if "uvicorn" in p.cmdline()]
        assert server, "the stage started no temporary Prefect server: " + log.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGINT)
        limit = STOP_GRACE_S + STOP_WITHIN
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"gdro train still ran {limit:.0f} s after Ctrl-C: {log.read_text()[-3000:]}") from None
    assert code == STOPPED_EXIT, log.read_text()[-3000:]
    assert "the next run resumes from it" in log.read_text()
    assert runs(tmp_path, "train") == ["KILLED"], why(tmp_path, log)
    assert any((tmp_path / "checkpoints" / "train").glob("*/step-*"))
    gone_within(server[0], STOP_WITHIN)
