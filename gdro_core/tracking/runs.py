"""MLflow tracking: one run per stage, params and per-step metrics, failures marked failed with their error.

Runs survive faults: a run left RUNNING by a killed process is marked KILLED by the next stage run, a
stage given a ``resume_key`` (training: its checkpoint directory) continues the unfinished run of that key,
an unreachable tracking server is reported at start instead of after minutes of retries, a metric that
cannot be logged mid-training is counted and skipped rather than stalling or killing the run, and a copied or
moved workspace writes its artifacts into its own ``mlartifacts/``, not the original's.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import traceback
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from gdro_core.data.store import write_json
from gdro_core.params import Params, section_dict
from gdro_core.tracking.locks import pid_alive, stage_lock
from gdro_core.tracking.uri import tracking_uri

log = logging.getLogger("gdro")
PID_TAG, HOST_TAG, RESUME_TAG, ROUND_TAG = "gdro.pid", "gdro.host", "gdro.resume_key", "gdro.round"


class TrackingError(RuntimeError):
    """The tracking server cannot be used; the message says how to fix it."""


def check_reachable(uri: str, timeout: float) -> None:
    """A remote tracking server must answer its health check now, not after minutes of silent retries."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status == 200:
                return
            problem = f"health check answered HTTP {response.status}"
    except OSError as err:
        problem = str(getattr(err, "reason", err))
    raise TrackingError(
        f"MLflow tracking server {uri} is not reachable ({problem}): start it (`gdro serve`), or set tracking.uri "
        "to the local store (sqlite:///mlflow.db)"
    )


ARTIFACT_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                    ("logged_models", "artifact_location"), ("model_versions", "storage_location"))
"""Where an MLflow sqlite store keeps absolute artifact locations (file URIs)."""


def _local_path(location: str) -> Path | None:
    from mlflow.utils.file_utils import local_file_uri_to_path

    if location.startswith("file:"):
        return Path(local_file_uri_to_path(location))
    return Path(location) if location.startswith("/") else None


def relocate_artifacts(params: Params, root: Path) -> list[str]:
    """A copied or moved workspace: the project's own sqlite store (``mlflow.db`` in the project) still names the
    original's ``mlartifacts/`` (MLflow stores absolute artifact locations), so its runs would write there. Point
    the experiment at this project's artifact folder, and each older run and version at its copy here where that
    copy exists (the others keep the original's location: nothing is lost). Returns what was done, one line each.

    Raises :class:`TrackingError` when the original cannot be told from the experiment's location."""
    import sqlite3

    uri, root = tracking_uri(params.tracking.uri, root), Path(root).resolve()
    db = Path(uri.removeprefix("sqlite:///"))
    relative = Path(params.tracking.artifact_location)
    if not uri.startswith("sqlite:///") or relative.is_absolute() or not db.is_file() or \
            not db.resolve().is_relative_to(root):
        return []
    with sqlite3.connect(db) as con:
        try:
            row = con.execute("SELECT artifact_location FROM experiments WHERE name = ?",
                              (params.tracking.experiment,)).fetchone()
        except sqlite3.Error:
            return []
        path = _local_path(row[0]) if row and row[0] else None
        if path is None or path.is_relative_to(root):
            return []
        n = len(relative.parts)
        if path.parts[-n:] != relative.parts:
            raise TrackingError(
                f"experiment '{params.tracking.experiment}' in {db} keeps its artifacts at {path}, outside this project "
                f"({root}), so its runs would write there: set tracking.experiment to a new name (a new experiment with "
                f"its artifacts in {root / relative}), or tracking.uri to that store's own project"
            )
        old = Path(*path.parts[:-n])
        done = []
        for table, column in ARTIFACT_COLUMNS:
            try:
                rows = con.execute(f'SELECT rowid, "{column}" FROM "{table}"').fetchall()
            except sqlite3.Error:
                continue
            moved = kept = 0
            for rowid, value in rows:
                local = _local_path(value) if value else None
                if local is None or not local.is_relative_to(old):
                    continue
                new = root / local.relative_to(old)
                if table != "experiments" and not new.exists():
                    kept += 1  # not copied along: it stays where its files are
                    continue
                text = new.as_uri() if value.startswith("file:") else str(new)
                con.execute(f'UPDATE "{table}" SET "{column}" = ? WHERE rowid = ?', (text, rowid))
                moved += 1
            if moved or kept:
                done.append(f"{table}: {moved} now in {root}" + (f", {kept} left in {old} (not copied here)"
                                                                    if kept else ""))
    log.warning("this workspace was copied or moved from %s: its MLflow store now keeps new artifacts in %s (%s)",
                old, root / relative, "; ".join(done))
    return done


def configure(params: Params, root: Path) -> str:
    """Point MLflow at the project's store and experiment; return the experiment id."""
    t = params.tracking
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(t.request_timeout))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(t.request_retries)
    uri = tracking_uri(t.uri, root)
    check_reachable(uri, t.connect_timeout)
    relocate_artifacts(params, root)  # a copied workspace writes into its own mlartifacts, not the original's
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(t.experiment)
    if exp is not None:
        return exp.experiment_id
    location = Path(t.artifact_location)
    location = location if location.is_absolute() else (root / location).resolve()
    return mlflow.create_experiment(t.experiment, artifact_location=location.as_uri())


def mark_stale_runs(experiment_id: str) -> list[str]:
    """Runs still RUNNING whose process on this host is gone (kill -9, power loss) end KILLED."""
    client = mlflow.MlflowClient()
    stale = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        if tags.get(HOST_TAG) == socket.gethostname() and PID_TAG in tags and not pid_alive(int(tags[PID_TAG])):
            client.set_terminated(run.info.run_id, status=RunStatus.to_string(RunStatus.KILLED))
            stale.append(run.info.run_id)
    if stale:
        log.warning("marked %d run(s) left RUNNING by a killed process as KILLED: %s", len(stale), stale)
    return stale


def _unfinished_run(experiment_id: str, resume_key: str) -> str | None:
    runs = mlflow.MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.`{RESUME_TAG}` = '{resume_key}'", order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs and runs[0].info.status in ("KILLED", "FAILED") else None


PENDING_DIR = ".gdro/unended_runs"
"""Runs whose end could not be recorded (tracking server down at the end of a stage): ended by the next stage run."""

TRACKING_FAULTS = (MlflowException, OSError)
"""What an unreachable or failing tracking server raises (requests' errors are OSErrors)."""


@contextmanager
def tracking_optional(what: str) -> Iterator[None]:
    """Bookkeeping in MLflow that must never fail a stage whose outputs are written: a fault is a warning."""
    try:
        yield
    except TRACKING_FAULTS as err:
        log.warning("could not %s in MLflow (%s); the stage's outputs are written and it goes on", what, err)


def _end_pending_runs(root: Path) -> None:
    """Record the end of runs a previous stage could not end because the tracking server was down then."""
    for marker in sorted((Path(root) / PENDING_DIR).glob("*.json")):
        pending = json.loads(marker.read_text())
        with tracking_optional(f"end run {pending['run_id']}"):
            try:
                mlflow.MlflowClient().set_terminated(pending["run_id"], pending["status"], pending["end_time"])
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":  # in another store (tracking.uri changed): drop it
                    raise
            marker.unlink()


def _end_run(root: Path, run_id: str, status: str) -> None:
    try:
        mlflow.end_run(status)  # pops the active run before it calls the server
    except TRACKING_FAULTS as err:
        log.warning("could not end MLflow run %s as %s (%s): the next stage run records it", run_id, status, err)
        write_json(Path(root) / PENDING_DIR / f"{run_id}.json",
                   {"run_id": run_id, "status": status, "end_time": int(time.time() * 1000)})


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_signals_deferred() -> Iterator[None]:
    """Ctrl-C or SIGTERM that arrives while a run's end is being recorded acts once it is recorded, through the
    handler it would have met. A stage is often stopped twice (a terminal's Ctrl-C reaches the whole process group,
    then `dvc repro`'s watcher sends SIGTERM; a scheduler signals every process): the second must not leave the
    run RUNNING. Python runs signal handlers in the main thread only, so elsewhere this changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    previous = {sig: handler for sig, handler in previous.items() if handler is not None}  # not set from Python
    for sig in previous:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if caught:
            os.kill(os.getpid(), caught[0])


STOPPED: list[str] = []
"""The stage runs of this process that were stopped from outside (the CLI's exit status reads it)."""


def stopped(err: BaseException) -> bool:
    """Stopped from outside (Ctrl-C, or SIGTERM, which Prefect raises as TerminationSignal), not failed."""
    from prefect.exceptions import TerminationSignal

    return isinstance(err, (KeyboardInterrupt, TerminationSignal))


ERROR_FILE = "error.txt"
PREVIOUS_ERROR_TAG = "gdro.previous_attempt_error"
"""A resumed run's interrupted attempt: its error, moved from ``error.txt`` to this tag (shortened)."""
MAX_TAG = 4000


def _set_aside_error(run) -> None:
    """A resumed run that then finishes must not carry the interrupted attempt's ``error.txt`` as if it failed:
    the error moves to a tag, and the artifact is deleted."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    client = mlflow.MlflowClient()
    if not any(f.path == ERROR_FILE for f in client.list_artifacts(run.info.run_id)):
        return
    text = Path(client.download_artifacts(run.info.run_id, ERROR_FILE)).read_text()
    mlflow.set_tag(PREVIOUS_ERROR_TAG, text[-MAX_TAG:])
    get_artifact_repository(run.info.artifact_uri).delete_artifacts(ERROR_FILE)


@contextmanager
def stage_run(
    params: Params, root: Path, stage: str, sections: tuple[str, ...] | None = None, nested: bool = False,
    resume_key: str = "", round: int = 1,
) -> Iterator:
    """An MLflow run for one stage; an exception is logged as ``error.txt`` and the run ends FAILED.

    It logs ``sections`` as params, by default the params the stage's declaration names (gdro_core/stages.py).

    Holds the workspace's lock for the stage and its outputs, so two runs cannot write the same files. Once the
    run has started, a tracking server that goes away never fails the stage: its end is recorded later. A later
    round (``round`` > 1) writes other outputs, so it holds its own lock, and its run is tagged ``gdro.round``.
    """
    if sections is None:
        from gdro_core.stages import stage_params

        sections = stage_params(stage, round, logged=True)
    outputs = section_dict(params, "paths") | ({"round": round} if round > 1 else {})
    with stage_lock(root, stage, outputs):
        experiment_id = configure(params, root)
        _end_pending_runs(root)
        mark_stale_runs(experiment_id)
        nested = nested or mlflow.active_run() is not None  # inside a sweep's config run: nest live
        resume = _unfinished_run(experiment_id, resume_key) if resume_key else None
        tags = {"gdro.stage": stage, PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}
        if resume_key:
            tags[RESUME_TAG] = resume_key
        if round > 1:
            tags[ROUND_TAG] = str(round)
        if resume is not None:
            log.info("continuing MLflow run %s of the interrupted %s", resume, stage)
            run = mlflow.start_run(run_id=resume, nested=nested, tags=tags)
            with tracking_optional("set the interrupted attempt's error aside"):
                _set_aside_error(run)
        else:
            run = mlflow.start_run(experiment_id=experiment_id, run_name=stage, nested=nested, tags=tags)
        status = RunStatus.to_string(RunStatus.FINISHED)
        try:
            if resume is None:
                mlflow.log_params(section_dict(params, *sections))
            yield run
        except BaseException as err:
            status = RunStatus.to_string(RunStatus.KILLED if stopped(err) else RunStatus.FAILED)
            if stopped(err):
                STOPPED.append(f"{stage}: {type(err).__name__}")
            with tracking_optional("record the error"):
                mlflow.log_text(traceback.format_exc(), ERROR_FILE)
            raise
        finally:
            with stop_signals_deferred():
                _end_run(root, run.info.run_id, status)


def metric_logger(echo=None, pause: float = 60.0):
    """A ``(step, metrics)`` callback that logs to MLflow and echoes a line (e.g. to Prefect's logger).

    A metric MLflow cannot take (server gone, network down) is counted and skipped: tracking never stops training.
    After a failure, metrics are skipped (and counted) for ``pause`` seconds before the server is tried again, so
    a server that is gone costs one request timeout per pause, not one per step.

    Each metric is logged once per step of a run: a resumed run (see :func:`stage_run`) redoes the steps after its
    last checkpoint, with the same values, and those its interrupted attempt logged already are not logged again.
    """
    failures = {"count": 0, "skipped": 0, "retry_at": 0.0}
    logged: dict[tuple[str, str], set[int]] = {}  # (run id, metric) -> the steps the run has, read once per metric

    def _new(run_id: str, step: int, metrics: dict[str, float]) -> dict[str, float]:
        client = mlflow.MlflowClient()
        for key in metrics:
            if (run_id, key) not in logged:
                logged[run_id, key] = {m.step for m in client.get_metric_history(run_id, key)}
        return {k: float(v) for k, v in metrics.items() if step not in logged[run_id, k]}

    def _log(step: int, metrics: dict[str, float]) -> None:
        if echo is not None:
            echo(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if time.monotonic() < failures["retry_at"]:
            failures["skipped"] += 1
            return
        try:
            active = mlflow.active_run()
            if active is None:
                mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
                return
            run_id = active.info.run_id
            new = _new(run_id, step, metrics)
            if new:
                mlflow.log_metrics(new, step=step)
            for key in new:
                logged[run_id, key].add(step)
        except Exception as err:  # noqa: BLE001 - any tracking failure is non-fatal by design
            failures["count"] += 1
            failures["retry_at"] = time.monotonic() + pause
            log.warning("could not log step %d metrics to MLflow (%d failed, %d skipped so far), training goes on; "
                        "next try in %.0f s: %s", step, failures["count"], failures["skipped"], pause, err)

    _log.failures = failures
    return _log
