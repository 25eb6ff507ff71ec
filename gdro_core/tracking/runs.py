"""MLflow tracking: one run per stage, params and per-step metrics, failures marked failed with their error."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow

from gdro_core.params import Params, section_dict

log = logging.getLogger("gdro")


def tracking_uri(uri: str, root: Path) -> str:
    """Relative ``sqlite:///x.db`` URIs are taken relative to the project root."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str((root / uri[len(prefix) :]).resolve())
    return uri


def configure(params: Params, root: Path) -> str:
    """Point MLflow at the project's store and experiment; return the experiment id."""
    mlflow.set_tracking_uri(tracking_uri(params.tracking.uri, root))
    exp = mlflow.get_experiment_by_name(params.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    location = Path(params.tracking.artifact_location)
    location = location if location.is_absolute() else (root / location).resolve()
    return mlflow.create_experiment(params.tracking.experiment, artifact_location=location.as_uri())


@contextmanager
def stage_run(params: Params, root: Path, stage: str, sections: tuple[str, ...], nested: bool = False) -> Iterator:
    """An MLflow run for one stage; an exception is logged as ``error.txt`` and the run ends FAILED."""
    experiment_id = configure(params, root)
    nested = nested or mlflow.active_run() is not None  # inside a sweep's config run: nest live
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, nested=nested, tags={"gdro.stage": stage}) as run:
        mlflow.log_params(section_dict(params, *sections))
        try:
            yield run
        except BaseException:
            mlflow.log_text(traceback.format_exc(), "error.txt")
            raise


def metric_logger(echo=None):
    """A ``(step, metrics)`` callback that logs to MLflow and echoes a line (e.g. to Prefect's logger)."""

    def _log(step: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
        if echo is not None:
            echo(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    return _log
