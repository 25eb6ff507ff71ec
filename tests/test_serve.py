"""`gdro serve`: real Prefect and MLflow servers on free loopback ports; flows, deployment runs and the registry
show up in them; Ctrl-C stops both cleanly."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import TINY
from gdro_core.servers import healthy

BIN = Path(sys.executable).parent
STARTUP_S = 300  # upper bound for both servers to answer on a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_hosts(port: int) -> set[str]:
    """Local addresses listening on ``port``, from the kernel's socket tables (Linux), as dotted IPv4 / hex IPv6."""
    hosts = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if not table.is_file():
            continue
        for line in table.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                hosts.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]) if len(addr) == 8 else addr)
    return hosts


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _mlflow_runs(base: str) -> list[dict]:
    exp = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=gdro")["experiment"]
    return _post(f"{base}/api/2.0/mlflow/runs/search",
                 {"experiment_ids": [exp["experiment_id"]], "max_results": 1000}).get("runs", [])


def _stage(run: dict) -> str:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}.get("gdro.stage", "")


def start_serve(root: Path, env: dict, ports: tuple[int, int], *extra: str) -> tuple[subprocess.Popen, list[str]]:
    """`gdro serve` on ``ports`` (Prefect, MLflow), once it says "ready"; its output lines so far and to come."""
    proc = subprocess.Popen([BIN / "gdro", "serve", "--prefect-port", str(ports[0]), "--mlflow-port", str(ports[1]),
                             *extra], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.strip() == "ready":
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + STARTUP_S
    while not ready.is_set() and proc.poll() is None and time.monotonic() < deadline:
        ready.wait(1.0)
    if not ready.is_set():
        proc.kill()
        raise AssertionError("gdro serve did not get ready:\n" + "".join(lines[-60:]))
    return proc, lines


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`gdro serve` in a tiny project, as a user starts it; stopped with SIGINT (Ctrl-C) at the end."""
    root = tmp_path_factory.mktemp("served-project")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY))
    prefect_port, mlflow_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env.update({"GDRO_ROOT": str(root), "PATH": f"{BIN}{os.pathsep}{env['PATH']}", "DVC_NO_ANALYTICS": "1"})
    proc, lines = start_serve(root, env, (prefect_port, mlflow_port))
    ns = SimpleNamespace(root=root, proc=proc, lines=lines, env=env,
                         prefect=f"http://127.0.0.1:{prefect_port}", mlflow=f"http://127.0.0.1:{mlflow_port}")
    yield ns
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture()
def prefect_client(served):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: f"{served.prefect}/api"}):
        with get_client(sync_client=True) as client:
            yield client


def test_servers_listen_on_loopback_and_a_gdro_command_reports_to_both(served, prefect_client):
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    out = "".join(served.lines)
    assert f"Prefect UI:  {served.prefect}\n" in out and f"MLflow UI:   {served.mlflow}\n" in out
    assert healthy(f"{served.prefect}/api/health") and healthy(f"{served.mlflow}/health")
    for url in (served.prefect, served.mlflow):
        hosts = listening_hosts(int(url.rsplit(":", 1)[1]))
        assert hosts == {"127.0.0.1"} or not Path("/proc/net/tcp").is_file(), hosts  # loopback only
    state = json.loads((served.root / ".prefect" / "serve.json").read_text())
    assert state["prefect_api_url"] == f"{served.prefect}/api"
    assert (served.root / ".prefect" / "prefect.db").is_file()  # the project's own Prefect home
    import psutil

    started = []
    for child in psutil.Process(served.proc.pid).children(recursive=True):
        try:
            started.append(" ".join(child.cmdline()))
        except psutil.Error:  # ended meanwhile
            pass
    assert not [c for c in started if "huey" in c], started  # MLflow's job runner serves nothing gdro logs

    # A plain `gdro prompts`, no PREFECT_API_URL set: it finds the running server by itself.
    done = subprocess.run([BIN / "gdro", "prompts"], cwd=served.root, env=served.env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = prefect_client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["prompts"])), limit=10,
                                         sort=FlowRunSort.EXPECTED_START_TIME_DESC)
    assert len(runs) == 1 and runs[0].state.is_completed()
    assert [(_stage(r), r["info"]["status"]) for r in _mlflow_runs(served.mlflow)] == [("prompts", "FINISHED")]


def test_pipeline_deployment_started_through_the_server_completes_with_task_runs_and_progress_logs(
        served, prefect_client):
    from prefect.client.schemas.sorting import LogSort, TaskRunSort
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:  # `gdro serve` says "ready" only once its deployments are registered
        deployment = prefect_client.read_deployment_by_name("pipeline/gdro")
    except ObjectNotFound:
        raise AssertionError("ready before pipeline/gdro was registered:\n" + "".join(served.lines[-60:])) from None
    assert deployment.entrypoint == "flows.pipeline.pipeline_flow"
    assert prefect_client.read_deployment_by_name("sweep/gdro").entrypoint == "flows.sweep.sweep_flow"

    run = run_deployment("pipeline/gdro", timeout=900, poll_interval=2, as_subflow=False)
    assert run.state.is_completed(), f"{run.state}\n" + "".join(served.lines[-80:])

    task_runs = prefect_client.read_task_runs(limit=200, sort=TaskRunSort.EXPECTED_START_TIME_DESC)
    assert task_runs and all(t.state.is_completed() for t in task_runs)
    tasks = {t.name.rsplit("-", 1)[0] for t in task_runs}
    assert {"pretrain_builtin", "sample_pools", "score_table", "fit_adapter", "score_models"} <= tasks
    logs, offset = [], 0
    while batch := prefect_client.read_logs(limit=200, offset=offset, sort=LogSort.TIMESTAMP_ASC):
        logs += [entry.message for entry in batch]
        offset += len(batch)
    assert any("rollout shard 1/1" in m for m in logs)  # progress of the long stages, in the Prefect logs
    assert any("scored chunk 1/1" in m for m in logs)
    assert any(m.startswith("step 4: ") and "train/loss=" in m for m in logs)

    runs = _mlflow_runs(served.mlflow)
    stages = [_stage(r) for r in runs if r["info"]["status"] == "FINISHED"]
    assert {"prompts", "base", "rollout", "score", "train", "evaluate"} <= set(stages)
    alias = _get(f"{served.mlflow}/api/2.0/mlflow/registered-models/alias?name=gdro-ocr-lora&alias=champion")
    assert alias["model_version"]["version"] == "1"


def test_ctrl_c_stops_both_servers_cleanly(served):
    served.proc.send_signal(signal.SIGINT)
    assert served.proc.wait(timeout=120) == 0, "".join(served.lines[-40:])
    out = "".join(served.lines)
    for name in ("deployments", "mlflow", "prefect"):
        assert f"{name} stopped (exit code" in out
    assert not healthy(f"{served.prefect}/api/health") and not healthy(f"{served.mlflow}/health")
    assert not (served.root / ".prefect" / "serve.json").exists()
