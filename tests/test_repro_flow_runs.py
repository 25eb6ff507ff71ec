"""Prefect flow runs a killed `gdro` command left Running end Crashed at the next command; live ones are left alone."""

import socket
import subprocess
import sys

from prefect import flow, get_client
from prefect.states import Running

from flows.context import HOST_TAG, PID_TAG, crash_orphaned_flow_runs


@flow(name="stage")
def stage():
    return None


def running_run(client, pid: int):
    run = client.create_flow_run(stage, tags=["gdro", f"{PID_TAG}{pid}", f"{HOST_TAG}{socket.gethostname()}"])
    client.set_flow_run_state(run.id, Running(), force=True)
    return run.id


def test_runs_of_dead_commands_end_crashed_and_runs_of_live_ones_stay_running(prefect_server):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with get_client(sync_client=True) as client:
            orphan, live = running_run(client, dead.pid), running_run(client, alive.pid)
            assert crash_orphaned_flow_runs() == [str(orphan)]
            assert client.read_flow_run(orphan).state.type.value == "CRASHED"
            assert f"pid {dead.pid}" in client.read_flow_run(orphan).state.message
            assert client.read_flow_run(live).state.type.value == "RUNNING"
            assert crash_orphaned_flow_runs() == []  # once is enough
    finally:
        alive.kill()
        alive.wait()
