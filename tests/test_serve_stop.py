"""`gdro serve` stopped from outside: SIGTERM during a deployment run leaves no run Running in Prefect or MLflow;
after kill -9 the next `gdro serve` names and stops what the killed one left, and names a foreign port holder."""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import yaml

from conftest import TINY
from test_serve import free_port, start_serve

BIN = Path(sys.executable).parent


def _project(root: Path, params: dict) -> dict[str, str]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env.update({"GDRO_ROOT": str(root), "PATH": f"{BIN}{os.pathsep}{env['PATH']}", "DVC_NO_ANALYTICS": "1",
                "OMP_NUM_THREADS": "1"})
    return env


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_sigterm_to_serve_during_a_deployment_run_leaves_no_run_running(tmp_path):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    params = {**TINY, "pretrain": {**TINY["pretrain"], "steps": 400, "checkpoint_every": 5, "log_every": 1}}
    env = _project(tmp_path, params)
    proc, lines = start_serve(tmp_path, env, (free_port(), free_port()))
    api = json.loads((tmp_path / ".prefect" / "serve.json").read_text())["prefect_api_url"]
    with temporary_settings({PREFECT_API_URL: api}):
        run = run_deployment("pipeline/gdro", timeout=0, as_subflow=False)
    deadline = time.monotonic() + 300
    while not any((tmp_path / "checkpoints" / "base").glob("*/step-*")):  # the deployment run is in pretraining
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines[-60:])
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=120) == 0, "".join(lines[-60:])
    finally:
        proc.kill()
    with sqlite3.connect(tmp_path / ".prefect" / "prefect.db") as db:
        flow_runs = db.execute("SELECT name, state_type, tags FROM flow_run").fetchall()
    assert flow_runs and not [r for r in flow_runs if r[1] in ("RUNNING", "PENDING")], (flow_runs, lines[-40:])
    top = [r for r in flow_runs if r[0] == run.name]
    assert top and top[0][1] in ("CRASHED", "CANCELLED"), flow_runs
    assert any(t.startswith("gdro.pid:") for t in json.loads(top[0][2])), top  # what a later command checks
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    found = mlflow.search_runs(search_all_experiments=True)
    statuses = dict(zip(found["tags.gdro.stage"], found["status"], strict=True))
    assert statuses.get("base") == "KILLED" and "RUNNING" not in statuses.values(), statuses


def test_the_next_serve_stops_what_a_killed_serve_left_and_names_a_foreign_port_holder(tmp_path):
    env = _project(tmp_path, TINY)
    ports = (free_port(), free_port())
    first, _ = start_serve(tmp_path, env, ports, "--no-deployments")
    left = psutil.Process(first.pid).children(recursive=True)
    assert left
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (tmp_path / ".prefect" / "serve.json").is_file() and all(_alive(p) for p in left)

    second, lines = start_serve(tmp_path, env, ports, "--no-deployments")  # the same ports: freed, not "in use"
    try:
        out = "".join(lines)
        for p in left:
            assert f"stopped pid {p.pid} (" in out and not _alive(p), out
    finally:
        second.send_signal(signal.SIGINT)
        assert second.wait(timeout=120) == 0

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        refused = subprocess.run([BIN / "gdro", "serve", "--prefect-port", str(port), "--no-deployments"],
                                 cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"pid {os.getpid()} (" in refused.stderr and "serve.prefect_port" in refused.stderr, refused.stderr
