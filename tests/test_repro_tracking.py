"""A tracking server that goes away mid-stage never stalls or fails the stage: metrics pause, the run's end is
recorded by the next stage run."""

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from conftest import TINY
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
