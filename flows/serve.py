"""`gdro serve` / `make ui`: a Prefect server and an MLflow tracking server for this project, on 127.0.0.1.

Both run as child processes (each in its own process group, logs under ``.prefect/logs/``) until Ctrl-C
or SIGTERM, which stops them (and the served deployments) cleanly. While they are up, every `gdro`
command run in the project reports to the Prefect server (see ``gdro_core.servers``), and the MLflow UI
shows the project's tracking store (``tracking.uri``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flows.context import project_root
from gdro_core.params import Params, load_params
from gdro_core.servers import (
    SERVE_ENV, STATE_FILE, ServeError, ServerSpec, healthy, local_store, mlflow_spec, port_holder, port_in_use,
    prefect_spec, stop_leftovers, write_state,
)
from gdro_core.tracking.uri import tracking_uri

STOP_GRACE_S = (15.0, 5.0, 5.0)  # seconds after SIGINT, SIGTERM, SIGKILL


class _Stop(Exception):
    """Raised in the main thread by SIGINT / SIGTERM."""


def _raise_stop(signum, frame) -> None:  # noqa: ARG001
    raise _Stop(signal.Signals(signum).name)


def _start(spec: ServerSpec, log_dir: Path, root: Path) -> tuple[subprocess.Popen, Path]:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.name}-server.log"
    log = open(log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
    proc = subprocess.Popen(spec.command, cwd=root, env={**os.environ, **spec.env}, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return proc, log_path


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait_healthy(spec: ServerSpec, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServeError(f"the {spec.name} server exited with code {proc.returncode} while starting; "
                             f"its log ({log_path}) ends with:\n{_tail(log_path)}")
        if healthy(spec.health_url):
            return
        time.sleep(0.5)
    raise ServeError(f"the {spec.name} server did not answer {spec.health_url} within {timeout:.0f} s "
                     f"(raise serve.startup_timeout on a slow machine); its log ({log_path}) ends with:\n"
                     f"{_tail(log_path)}")


def _descendants(procs: list[tuple[str, subprocess.Popen]]) -> list:
    import psutil

    found = []
    for _, proc in procs:
        try:
            found += psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            continue
    return found


def _running(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _stop(procs: list[tuple[str, subprocess.Popen]], graces: tuple[float, ...] = STOP_GRACE_S) -> None:
    """SIGINT to each child's process group, then SIGTERM, then SIGKILL to those still up after each grace period;
    then the same to what they started in process groups of their own (flow runs), so that nothing is left."""
    import psutil

    began = time.monotonic()
    below = _descendants(procs)
    for sig, grace in zip((signal.SIGINT, signal.SIGTERM, signal.SIGKILL), graces, strict=True):
        alive = [(name, proc) for name, proc in procs if proc.poll() is None]
        for _, proc in alive:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for _, proc in alive:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    for sig, grace in zip((signal.SIGTERM, signal.SIGKILL), graces[1:], strict=True):
        below = [p for p in below if _running(p)]
        for p in below:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        psutil.wait_procs(below, timeout=grace)
    for name, proc in procs:
        print(f"{name} stopped (exit code {proc.poll()}, {time.monotonic() - began:.1f} s)", flush=True)


def _end_runs_left_running(api_url: str, params: Params, root: Path, why: str) -> None:
    """Deployment runs stopped with `gdro serve` (or left by a killed one) end Crashed in Prefect and KILLED in
    MLflow (their processes are gone by now), instead of staying Running."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.context import crash_orphaned_flow_runs
    from gdro_core.tracking.runs import configure, mark_stale_runs

    try:
        with temporary_settings({PREFECT_API_URL: api_url}):
            crashed = crash_orphaned_flow_runs(deployment_runs=True, message=why)
        if crashed:
            print(f"marked {len(crashed)} flow run(s) left Running as Crashed ({why})", flush=True)
    except Exception as err:  # noqa: BLE001 - stopping goes on whatever the bookkeeping does
        print(f"could not mark the flow runs in flight as Crashed ({err}): the next gdro command does", flush=True)
    try:
        killed = mark_stale_runs(configure(params, root))
        if killed:
            print(f"marked {len(killed)} MLflow run(s) left RUNNING as KILLED ({why})", flush=True)
    except Exception as err:  # noqa: BLE001
        print(f"could not mark the MLflow runs in flight as KILLED ({err}): the next stage run does", flush=True)


def server_specs(root: Path, params: Params, prefect_port: int | None = None,
                 mlflow_port: int | None = None) -> list[ServerSpec]:
    """The Prefect and MLflow servers of this project (ports from params.yaml unless given)."""
    s = params.serve
    specs = [prefect_spec(s.host, prefect_port or s.prefect_port, root / ".prefect")]
    uri = tracking_uri(params.tracking.uri, root)
    if local_store(uri):
        location = Path(params.tracking.artifact_location)
        location = location if location.is_absolute() else root / location
        specs.append(mlflow_spec(s.host, mlflow_port or s.mlflow_port, uri, location.resolve()))
    else:
        print(f"tracking.uri is {uri}: runs go to that server, so no local MLflow server is started", flush=True)
    for spec in specs:
        port = int(spec.ui_url.rsplit(":", 1)[1])
        if port_in_use(s.host, port):
            holder = port_holder(port)
            who = (f"{holder} holds it, not a `gdro serve` of this project: stop it (kill "
                   f"{holder.split()[1]})" if holder else "stop what holds it (`ss -ltnp` names it)")
            raise ServeError(f"port {port} on {s.host} is already in use: {who}, or pick another port with "
                             f"--{spec.name}-port or serve.{spec.name}_port in params.yaml")
    return specs


DEPLOYMENTS = ("pipeline/gdro", "sweep/gdro")


def _wait_deployments(api_url: str, proc: subprocess.Popen, timeout: float) -> None:
    """"ready" only once the Prefect server knows the deployments, so the UI can start them when it says so."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + timeout
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        for name in DEPLOYMENTS:
            while True:
                if proc.poll() is not None:
                    raise ServeError(f"the deployments process exited with code {proc.returncode} before {name} was "
                                     "registered")
                try:
                    client.read_deployment_by_name(name)
                    break
                except ObjectNotFound:
                    if time.monotonic() > deadline:
                        raise ServeError(f"{name} was not registered within {timeout:.0f} s: raise "
                                         "serve.startup_timeout on a slow machine") from None
                    time.sleep(0.5)


def serve(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None,
          prefect_port: int | None = None, mlflow_port: int | None = None, deployments: bool | None = None) -> int:
    """Start the servers, print their URLs, run until Ctrl-C / SIGTERM, then stop everything. Returns 0."""
    root = project_root()
    params = load_params(root / params_path if not Path(params_path).is_absolute() else params_path, overrides)
    for line in stop_leftovers(root):
        print(f"stopped {line}, left running by a killed `gdro serve` of this project", flush=True)
    os.environ[SERVE_ENV] = str(os.getpid())  # inherited by all it starts: found and stopped if this one is killed
    specs = server_specs(root, params, prefect_port, mlflow_port)
    serve_deployments = params.serve.deployments if deployments is None else deployments
    log_dir = root / ".prefect" / "logs"
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    procs: list[tuple[str, subprocess.Popen]] = []
    state = root / STATE_FILE
    prefect = specs[0]
    api_url = f"{prefect.ui_url}/api"
    mlflow_url = specs[1].ui_url if len(specs) > 1 else tracking_uri(params.tracking.uri, root)

    def record() -> None:
        write_state(root, api_url, prefect.ui_url, mlflow_url, os.getpid(), [proc.pid for _, proc in procs])

    try:
        started = [(spec, *_start(spec, log_dir, root)) for spec in specs]
        procs += [(spec.name, proc) for spec, proc, _ in started]
        record()
        for spec, proc, log_path in started:
            _wait_healthy(spec, proc, log_path, params.serve.startup_timeout)
        _end_runs_left_running(api_url, params, root, "its gdro serve was killed")  # by a `gdro serve` before
        if serve_deployments:
            cmd = [sys.executable, "-m", "flows.cli", "deploy", "--params", params_path,
                   *[a for k, v in (overrides or {}).items() for a in ("--set", f"{k}={json.dumps(v)}")]]
            env = {**os.environ, "PREFECT_API_URL": api_url, "GDRO_ROOT": str(root)}
            deploy = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
            procs.append(("deployments", deploy))
            record()
            _wait_deployments(api_url, deploy, params.serve.startup_timeout)
        print(f"Prefect UI:  {prefect.ui_url}\nPrefect API: {api_url}\nMLflow UI:   {mlflow_url}\n"
              f"server logs: {log_dir}\n"
              + ("deployments: pipeline/gdro and sweep/gdro (start or schedule them from the Prefect UI)\n"
                 if serve_deployments else "")
              + "gdro commands and `dvc repro` in this project now report to these servers; Ctrl-C stops them.\n"
              "ready", flush=True)
        while True:
            for name, proc in procs:
                if proc.poll() is not None:
                    raise ServeError(f"the {name} process exited with code {proc.returncode}; stopping the others"
                                     + (f" (log: {log_dir / f'{name}-server.log'})" if name != "deployments" else ""))
            time.sleep(1.0)
    except _Stop as stop:
        print(f"\n{stop}: stopping the servers", flush=True)
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        state.unlink(missing_ok=True)
        # the deployments first (they pause their schedules through the Prefect server), then the runs they left
        # Running are ended while the Prefect server is still up, then both servers at once
        deployments = [(name, proc) for name, proc in procs if name == "deployments"]
        _stop(deployments)
        if deployments:
            _end_runs_left_running(api_url, params, root, "gdro serve was stopped while this run was in flight")
        _stop([(name, proc) for name, proc in procs if name != "deployments"])
        for sig, handler in previous.items():
            signal.signal(sig, handler)
