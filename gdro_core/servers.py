"""The project's local servers: command lines, URLs, health checks and the state file other commands read.

`gdro serve` starts a Prefect server and an MLflow tracking server bound to 127.0.0.1, writes their URLs
to ``.prefect/serve.json``; while it is up every other `gdro` command of the project (and `dvc repro`)
reports its flow runs to that Prefect server. Nothing here imports Prefect (its settings are read at import).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

STATE_FILE = Path(".prefect") / "serve.json"


class ServeError(RuntimeError):
    """A server that cannot start; the message says why and what to change."""


@dataclass(frozen=True)
class ServerSpec:
    name: str
    command: list[str]
    health_url: str
    ui_url: str
    env: dict[str, str] = field(default_factory=dict)


def tool(name: str) -> list[str]:
    """The console script of ``name`` next to this interpreter (the project's environment), else ``python -m``."""
    script = Path(sys.executable).with_name(name)
    return [str(script)] if script.is_file() else [sys.executable, "-m", name]


def prefect_spec(host: str, port: int, prefect_home: Path) -> ServerSpec:
    """``prefect server start`` on ``host:port`` with its settings and SQLite database under ``prefect_home``."""
    base = f"http://{host}:{port}"
    return ServerSpec(
        name="prefect",
        command=[*tool("prefect"), "server", "start", "--host", host, "--port", str(port), "--no-background"],
        health_url=f"{base}/api/health",
        ui_url=base,
        env={"PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
             "PREFECT_UI_API_URL": f"{base}/api", "PREFECT_API_URL": f"{base}/api"},
    )


def mlflow_spec(host: str, port: int, backend_store_uri: str, artifact_root: Path) -> ServerSpec:
    """``mlflow server`` over the project's tracking store (one worker: the UI, not a production deployment)."""
    base = f"http://{host}:{port}"
    return ServerSpec(
        name="mlflow",
        command=[*tool("mlflow"), "server", "--host", host, "--port", str(port), "--workers", "1",
                 "--backend-store-uri", backend_store_uri, "--default-artifact-root", artifact_root.as_uri(),
                 "--no-serve-artifacts"],
        health_url=f"{base}/health",
        ui_url=base,
        # MLflow's job runner (seven huey consumer processes, for GenAI evaluation jobs and trace rollups) serves
        # nothing gdro logs: without it the server starts sooner and leaves fewer processes to stop
        env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )


def local_store(uri: str) -> bool:
    """True for a tracking URI this machine's MLflow server can open (SQLite or a local directory)."""
    return uri.startswith(("sqlite:///", "file:")) or "://" not in uri


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def healthy(url: str, timeout: float = 2.0) -> bool:
    """One HTTP GET answered with 2xx within ``timeout`` seconds."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback URL built here
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def write_state(root: Path, prefect_api_url: str, prefect_ui_url: str, mlflow_url: str, pid: int,
                children: list[int] = ()) -> Path:
    """``.prefect/serve.json``: the servers' URLs, and the pids of `gdro serve` and of the ``children`` it started
    (with their start times), so that the next `gdro serve` can stop them if this one is killed."""
    path = root / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"prefect_api_url": prefect_api_url, "prefect_ui_url": prefect_ui_url,
                                "mlflow_url": mlflow_url, "pid": pid, "create_time": child_record(pid)["create_time"],
                                "children": [child_record(c) for c in children]}, indent=2) + "\n")
    return path


def read_state(root: Path) -> dict | None:
    try:
        return json.loads((root / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def attach_to_running_server(root: Path, environ: dict | None = None) -> str | None:
    """Point Prefect at this project's running `gdro serve` (``PREFECT_API_URL``) unless it is already set.

    Returns the API URL used, or None (no server running: flows use Prefect's own temporary server).
    """
    environ = os.environ if environ is None else environ
    if environ.get("PREFECT_API_URL"):
        return None
    state = read_state(root)
    url = (state or {}).get("prefect_api_url")
    if not url or not healthy(f"{url}/health", timeout=1.0):
        return None
    environ["PREFECT_API_URL"] = url
    return url


OWNER_ENV = "GDRO_OWNER_PID"
TEMP_SERVER_MARK = "prefect.server.api.server:create_app"


def mark_owner(environ: dict | None = None) -> None:
    """Children (such as Prefect's temporary server) inherit this process's pid and start time, so an orphan can be
    found later, even once the pid has been reused by an unrelated process."""
    import psutil

    me = psutil.Process()
    (os.environ if environ is None else environ)[OWNER_ENV] = f"{me.pid}:{me.create_time():.3f}"


def owner_alive(record: str) -> bool:
    """True when the process an ``OWNER_ENV`` record (``pid:start time``, or a bare pid) names still runs; an
    unreadable record leaves its children alone."""
    pid, _, started = record.partition(":")
    try:
        return serve_alive({"pid": int(pid), "create_time": float(started) if started else None})
    except ValueError:
        return True


def reap_orphaned_temporary_servers(mark: str = TEMP_SERVER_MARK) -> list[int]:
    """Stop Prefect temporary servers (command lines holding ``mark``) left running by a `gdro` command that was
    killed (kill -9 skips their shutdown); a server whose owner is alive, or one not started by gdro, is left alone."""
    import psutil

    reaped = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if mark not in " ".join(proc.info["cmdline"] or []):
                continue
            owner = proc.environ().get(OWNER_ENV)
            if owner is None or owner_alive(owner):
                continue
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except psutil.TimeoutExpired:
                proc.kill()
            reaped.append(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
            continue
    return reaped


SERVE_ENV = "GDRO_SERVE_PID"
"""Set by `gdro serve` for everything it starts (servers, deployments, their flow runs), so that the processes a
killed `gdro serve` left behind can be found and stopped by the next one."""


def describe(proc) -> str:
    """``pid N (command line)`` of a psutil process, for messages."""
    import psutil

    try:
        cmd = " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        cmd = "?"
    return f"pid {proc.pid} ({cmd[:160]})"


def child_record(pid: int) -> dict:
    """What serve.json keeps of a child it started: enough to tell it from a later process that reuses the pid."""
    import psutil

    try:
        return {"pid": pid, "create_time": psutil.Process(pid).create_time()}
    except psutil.Error:
        return {"pid": pid, "create_time": 0.0}


def serve_alive(state: dict) -> bool:
    """True when the process ``state`` names (``pid``, optional ``create_time``) still runs, not a later process
    that reuses its pid: the `gdro serve` that wrote serve.json, or a command that owns a temporary server."""
    import psutil

    try:
        proc = psutil.Process(int(state["pid"]))
        started = state.get("create_time")
        if started is not None and abs(proc.create_time() - float(started)) > 1.0:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def leftover_processes(root: Path) -> list:
    """The processes a killed (kill -9) `gdro serve` of this project left running: it is named in
    ``.prefect/serve.json`` and gone, and they are the children it recorded there or carry its pid in SERVE_ENV."""
    import psutil

    state = read_state(root)
    if not state or "pid" not in state or serve_alive(state):
        return []
    found = {}
    for child in state.get("children", []):
        try:
            proc = psutil.Process(int(child["pid"]))
            if abs(proc.create_time() - float(child.get("create_time", 0.0))) <= 1.0:
                found[proc.pid] = proc
        except (psutil.Error, KeyError, TypeError, ValueError):
            continue
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(SERVE_ENV) == str(state["pid"]):
                found[proc.pid] = proc
        except psutil.Error:
            continue
    return [found[pid] for pid in sorted(found)]


def stop_leftovers(root: Path, grace: float = 5.0) -> list[str]:
    """Stop what a killed `gdro serve` of this project left running (SIGTERM, then SIGKILL after ``grace``) and
    remove its state file; returns a line per process stopped. A `gdro serve` still running is an error."""
    import psutil

    state = read_state(root)
    if state and "pid" in state and serve_alive(state) and int(state["pid"]) != os.getpid():
        raise ServeError(f"`gdro serve` is already running for this project ({describe(psutil.Process(state['pid']))}"
                         f"): use it, or stop it first (Ctrl-C in its terminal, or kill {state['pid']})")
    procs = leftover_processes(root)
    lines = [describe(proc) for proc in procs]
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace)
    if state is not None:
        (root / STATE_FILE).unlink(missing_ok=True)
    return lines


def port_holder(port: int) -> str | None:
    """``pid N (command line)`` of the process listening on TCP ``port``, when this user may see it."""
    import psutil

    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return None
    for conn in conns:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            try:
                return describe(psutil.Process(conn.pid))
            except psutil.Error:
                return f"pid {conn.pid}"
    return None
