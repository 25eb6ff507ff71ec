"""A tracking server that goes away mid-stage never stalls or fails the stage: metrics pause, the run's end is
recorded by the next stage run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from conftest import TINY, scored_copy
from gdro_core.params import parse_params
from gdro_core.tracking.runs import PENDING_DIR, metric_logger, stage_run, tracking_optional


def test_after_a_failed_metric_log_metrics_pause_instead_of_retrying_every_step(monkeypatch):
    calls = []

    def down(metrics, step):
        calls.append(step)
        raise MlflowException("connection refused")

    monkeypatch.setattr(mlflow, "log_metrics", down)
    log = metric_logger(pause=3600.0)
    for step in range(1, 11):
        log(step, {"loss": 1.0 / step})
    assert calls == [1]  # one request to the dead server, not one per step
    assert log.failures["count"] == 1 and log.failures["skipped"] == 9


def test_a_server_gone_at_the_end_of_a_stage_does_not_fail_it_and_the_next_run_records_the_end(tmp_path, monkeypatch):
    params = parse_params(TINY)
    real = mlflow.MlflowClient.set_terminated

    def down(self, *args, **kwargs):
        raise MlflowException("API request failed: connection refused")

    monkeypatch.setattr(mlflow.MlflowClient, "set_terminated", down)
    with stage_run(params, tmp_path, "train", ("train",)) as run:
        with tracking_optional("log the adapter"):
            raise MlflowException("connection refused")  # post-training bookkeeping: a warning, not a failure
        done = run.info.run_id
    assert mlflow.active_run() is None  # the run is off the stack: a next stage starts its own
    assert mlflow.get_run(done).info.status == "RUNNING"
    assert list((tmp_path / PENDING_DIR).glob("*.json"))

    monkeypatch.setattr(mlflow.MlflowClient, "set_terminated", real)  # the server is back
    with stage_run(params, tmp_path, "evaluate", ("evaluate",)):
        pass
    assert mlflow.get_run(done).info.status == "FINISHED"  # ended as it ended, not marked KILLED
    assert not list((tmp_path / PENDING_DIR).glob("*.json"))


def test_an_unended_run_of_another_store_is_dropped(tmp_path):
    (tmp_path / PENDING_DIR).mkdir(parents=True)
    marker = tmp_path / PENDING_DIR / "0123.json"
    marker.write_text(json.dumps({"run_id": "0" * 32, "status": "FINISHED", "end_time": 0}))
    with stage_run(parse_params(TINY), tmp_path, "prompts", ("prompts",)):
        pass
    assert not marker.exists()


def test_a_failing_stage_still_ends_failed_with_its_error(tmp_path):
    params = parse_params(TINY)
    with pytest.raises(RuntimeError, match="boom"):
        with stage_run(params, tmp_path, "train", ("train",)) as run:
            raise RuntimeError("boom")
    assert mlflow.get_run(run.info.run_id).info.status == "FAILED"
    assert "boom" in mlflow.artifacts.load_text(f"{run.info.artifact_uri}/error.txt")


def test_tracking_optional_lets_programming_errors_through():
    with pytest.raises(KeyError):
        with tracking_optional("log"):
            raise KeyError("a bug, not a tracking fault")


BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, seconds: float, what: str, every: float = 0.5) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_the_tracking_server_stopping_mid_train_loses_no_training(scored, tmp_path):
    """Before: training blocked at the next metric log and died minutes later, losing the steps since its checkpoint."""
    # long enough that a fast machine cannot finish between the first checkpoint and the server's stop
    params = {**TINY, "train": {**TINY["train"], "steps": 48, "checkpoint_every": 2},
              "evaluate": {**TINY["evaluate"], "checkpoint_every": 16}}
    tmp_path = tmp_path / "project"
    env = scored_copy(scored, tmp_path, params)

    url = f"http://127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_for(lambda: healthy(url), 120, "the MLflow server")
        train = subprocess.Popen([BIN / "gdro", "train", "--set", f"tracking.uri={url}", "--set",
                                  "tracking.metric_pause=3600"], cwd=tmp_path, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for(lambda: list(tmp_path.glob("checkpoints/train/*/step-0000002")) or train.poll() is not None,
                 300, "the first checkpoint", every=0.02)
        assert train.poll() is None, "training finished before the server could be stopped"
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    log, _ = train.communicate(timeout=300)
    assert train.returncode == 0, log[-3000:]
    assert log.count("could not log step") == 1  # one try at the dead server, then metrics pause: no stall per step
    assert "training goes on" in log
    summary = json.loads((tmp_path / "reports" / "train_summary.json").read_text())
    assert summary["kept_step"] in (16, 32, 48)  # training ran to its end
    assert (tmp_path / "models" / "adapter" / "pytorch_lora_weights.safetensors").is_file()

    # the run could not be ended on the dead server; the next stage run (local store) records its end
    pending = list((tmp_path / PENDING_DIR).glob("*.json"))
    assert len(pending) == 1
    run_id = json.loads(pending[0].read_text())["run_id"]
    with stage_run(parse_params(params), tmp_path, "evaluate", ("evaluate",)):
        pass
    assert mlflow.get_run(run_id).info.status == "FINISHED"


def test_a_resumed_training_logs_each_step_once(tmp_path, one_thread):
    from training_fixtures import tiny_data, tiny_model

    from gdro_core.evaluation.judge import make_task_judge
    from gdro_core.evaluation.monitor import CheckpointMonitor
    from gdro_core.tasks.ocr.prompts import OcrPrompt
    from gdro_core.tasks.ocr.task import OcrTask
    from gdro_core.training.loop import train

    class ReadsNothing:
        def read(self, images):
            return [""] * len(images)

    p = parse_params({**TINY, "evaluate": {**TINY["evaluate"], "checkpoint_every": 2}})
    data, rewards = tiny_data(p)
    val = [OcrPrompt('"123" on a sign', "123"), OcrPrompt('"456" on a sign', "456")]

    def attempt(fail_at: int | None) -> str:
        model, task = tiny_model(p), OcrTask(p, reader=ReadsNothing())
        with stage_run(p, tmp_path, "train", ("train",), resume_key="k") as run:
            log = metric_logger()
            monitor = CheckpointMonitor(model, val, task, make_task_judge(task, p.judge), judge_task="ocr", seed=0,
                                        steps=p.sampler.steps, guidance=1.0, batch_size=4, keep="best_corrected",
                                        workdir=tmp_path / "ckpt" / "monitor", log=log)
            monitor.evaluate_base()

            def on_checkpoint(step, weights):
                if step == fail_at:  # after steps 3 and 4 were logged; the rerun resumes from step 2's checkpoint
                    raise RuntimeError("judge crashed")
                monitor(step, weights)

            train(model, data, rewards, p.train, tmp_path / "ckpt", log, on_checkpoint=on_checkpoint, eval_every=2)
        return run.info.run_id

    with pytest.raises(RuntimeError, match="judge crashed"):
        attempt(fail_at=4)
    run_id = attempt(fail_at=None)
    client = mlflow.MlflowClient()
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = {k: [m.step for m in client.get_metric_history(run_id, k)] for k in client.get_run(run_id).data.metrics}
    assert steps["train/loss"] == [1, 2, 3, 4] and steps["checkpoint/corrected"] == [0, 2, 4]
    assert all(len(s) == len(set(s)) for s in steps.values()), steps


def test_a_second_stop_signal_while_the_run_ends_waits_until_it_has_ended_killed(tmp_path, monkeypatch):
    """Stopped twice (Ctrl-C reaches the process group, then `dvc repro`'s watcher sends SIGTERM): the second signal
    lands while the run is being ended, and still the run ends KILLED before that signal acts."""
    params = parse_params(TINY)
    real_end = mlflow.end_run
    order = []

    def end_run_hit_by_sigterm(status):
        os.kill(os.getpid(), signal.SIGTERM)  # handled at once, were it not deferred
        order.append(f"end {status}")
        real_end(status)

    def terminated(signum, frame):
        order.append("SIGTERM acted")
        raise SystemExit(143)

    monkeypatch.setattr(mlflow, "end_run", end_run_hit_by_sigterm)
    sigint = signal.getsignal(signal.SIGINT)  # Python's, or ignored in a pytest-xdist worker
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        with pytest.raises(SystemExit):
            with stage_run(params, tmp_path, "train", ("train",)) as run:
                raise KeyboardInterrupt  # the first stop
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert order == ["end KILLED", "SIGTERM acted"]
    assert mlflow.get_run(run.info.run_id).info.status == "KILLED"
    assert signal.getsignal(signal.SIGINT) is sigint  # the handler it found is back
