"""Rollout and score fanned out over Dask and Ray give the serial run's files, byte for byte."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pytest
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from conftest import TINY, in_project, tiny_project
from gdro_core.data.fanout import RolloutJob, run_jobs, run_rollout_job
from gdro_core.tasks.ocr.prompts import read_prompts
from gdro_core.data.rollout import plan_shards, prepare_rollouts, write_manifest
from gdro_core.layout import Layout
from gdro_core.params import Scale, parse_params

BIN = Path(sys.executable).parent

# Four prompts, one per shard: four rollout shards and four scoring chunks to spread over 2 workers.
CONFIG = {**TINY, "sampler": {**TINY["sampler"], "batch_size": TINY["rollout"]["images_per_prompt"]}}


def _needs(module: str, package: str) -> None:
    """Skip, saying so, only when the runner's package is not installed (any other import error fails)."""
    pytest.importorskip(module, reason=f"{package} is not installed: `pip install -e '.[scale]'`",
                        exc_type=ModuleNotFoundError)


def _outputs(root: Path, scored: bool = True) -> dict[str, bytes]:
    """Every file the rollout (and score) stages wrote, by path relative to the project."""
    files = sorted(p for p in (root / "data" / "rollouts").rglob("*") if p.is_file())
    files += [root / "data" / "rewards.parquet"] if scored else []
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def serial(tmp_path_factory, prefect_server):
    """Prompts and a small random base, then rollout + score in this process (scale.runner: local)."""
    root = tiny_project(tmp_path_factory.mktemp("serial"), CONFIG)
    mp = pytest.MonkeyPatch()
    mp.setenv("GDRO_ROOT", str(root))
    _run(root, {})
    mp.undo()
    return root


def _run(root: Path, overrides: dict) -> None:
    from flows.rollout import rollout_flow
    from flows.score import score_flow

    rollout_flow(params_path="params.yaml", overrides=overrides)
    score_flow(params_path="params.yaml", overrides=overrides)


def _copy_inputs(serial: Path, dest: Path) -> Path:
    dest.mkdir()
    shutil.copy(serial / "params.yaml", dest / "params.yaml")
    shutil.copytree(serial / "data" / "prompts", dest / "data" / "prompts")
    shutil.copytree(serial / "models" / "base", dest / "models" / "base")
    return dest


def _assert_same(serial: Path, other: Path) -> None:
    want, got = _outputs(serial), _outputs(other)
    assert sorted(got) == sorted(want)
    assert len([k for k in want if k.endswith(".safetensors")]) == 4 and len([k for k in want if k.endswith(".png")]) == 16
    different = [k for k in want if got[k] != want[k]]
    assert not different, f"fanned-out outputs differ from the serial run: {different}"


def test_an_existing_dask_cluster_matches_serial_run(serial, tmp_path, monkeypatch):
    """Both stages on one Dask cluster that is already running (``scale.address``), as on a user's cluster; the
    clusters a stage starts itself are the killed-worker and SIGTERM tests' below."""
    _needs("prefect_dask", "prefect-dask")
    from distributed import LocalCluster
    from prefect.settings import PREFECT_API_URL

    root = _copy_inputs(serial, tmp_path / "dask")
    monkeypatch.setenv("GDRO_ROOT", str(root))
    env = {"PREFECT_API_URL": PREFECT_API_URL.value(), "OMP_NUM_THREADS": "1"}  # workers report to the flow's server
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", env=env) as cluster:
        _run(root, {"scale.runner": "dask", "scale.address": cluster.scheduler_address, "scale.threads_per_worker": 1})
    _assert_same(serial, root)


def test_ray_local_cluster_matches_serial_run(serial, tmp_path, monkeypatch):
    _needs("prefect_ray", "prefect-ray")
    root = _copy_inputs(serial, tmp_path / "ray")
    monkeypatch.setenv("GDRO_ROOT", str(root))
    _run(root, {"scale.runner": "ray", "scale.workers": 2, "scale.threads_per_worker": 1})
    _assert_same(serial, root)



@task(cache_policy=NO_CACHE)
def _dies_once(job):
    """Shard 1's worker process is killed the first time it runs it (a marker file says it happened)."""
    marker = Path(job.out_dir).parent / "killed.txt"
    if job.shard.index == 1 and not marker.exists():
        marker.write_text("killed")
        os._exit(1)
    return run_rollout_job(job)


def test_a_killed_dask_worker_shard_is_redone_elsewhere(serial, tmp_path):
    _needs("prefect_dask", "prefect-dask")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    from gdro_core.cache_keys import rollout_fingerprint

    root = _copy_inputs(serial, tmp_path / "killed")
    lay = Layout(root=root, params=parse_params(CONFIG))
    fp, out, p = rollout_fingerprint(lay), lay.rollout_dir, lay.params
    shards = plan_shards(read_prompts(lay.prompts("train")), 4, p.rollout.seed, 1)
    prepare_rollouts(out)
    jobs = [RolloutJob(shard=s, params_json=p.model_dump_json(), base_dir=str(lay.base_dir), out_dir=str(out),
                       fingerprint=fp, threads=1)
            for s in shards]

    @flow
    def fan_out():
        return run_jobs(Scale(runner="dask", workers=2, threads_per_worker=1), _dies_once, jobs)

    records = fan_out()
    assert (tmp_path / "killed" / "data" / "killed.txt").read_text() == "killed"  # a worker did die
    assert [r["shard"] for r in records] == [s.name for s in shards]
    write_manifest(out, shards, 4, fp)
    assert _outputs(root, scored=False) == _outputs(serial, scored=False)


class _ChokesOnOne:
    """An OCR reader that raises on one rollout image and reads every other as "1"."""

    def read(self, images):
        if any(im.filename.endswith("00001_002.png") for im in images):
            raise RuntimeError("recognizer crashed")
        return ["1"] * len(images)


def test_score_goes_on_past_a_reader_error_until_the_threshold(serial, tmp_path, monkeypatch):
    import pandas as pd

    import flows.score
    from flows.score import score_flow
    from gdro_core.data.scoring import ScoringError

    root = _copy_inputs(serial, tmp_path / "flaky")
    shutil.copytree(serial / "data" / "rollouts", root / "data" / "rollouts")
    monkeypatch.setenv("GDRO_ROOT", str(root))
    from gdro_core.tasks.ocr.task import OcrTask

    monkeypatch.setattr(flows.score, "make_task", lambda params: OcrTask(params, reader=_ChokesOnOne()))
    score_flow(params_path="params.yaml", overrides={"reward.max_error_share": 0.1})
    table = pd.read_parquet(root / "data" / "rewards.parquet")
    bad = table[(table["prompt_index"] == 1) & (table["member"] == 2)].iloc[0]
    assert bad["reward"] == 0.0 and bad["error"] == "RuntimeError: recognizer crashed"
    assert (table["error"] != "").sum() == 1 and len(table) == 16

    (root / "data" / "rewards.parquet").unlink()
    with pytest.raises(ScoringError, match="1 of 16 images"):
        score_flow(params_path="params.yaml", overrides={"reward.max_error_share": 0.05})
    assert not (root / "data" / "rewards.parquet").exists()  # no table to cache when the stage fails


def _descendants(pid: int, seen: dict, stop: threading.Event) -> None:
    """Every process below ``pid`` while it runs, by pid: (create time, command line, parent pid)."""
    import psutil

    while not stop.is_set():
        try:
            for child in psutil.Process(pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    seen.setdefault(child.pid, (child.create_time(), " ".join(child.cmdline()), child.ppid()))
        except psutil.Error:
            return
        time.sleep(0.2)


def _still_running(seen: dict) -> list[str]:
    import psutil

    alive = []
    for pid, (created, cmd, _) in seen.items():
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{pid}: {cmd[:200]}")
    return alive


def _worker_servers(seen: dict, flow_pid: int) -> list[str]:
    """Temporary Prefect servers started below ``flow_pid`` by any process but the flow's own (by its workers)."""
    from gdro_core.servers import TEMP_SERVER_MARK

    return [cmd[-120:] for _, cmd, parent in seen.values() if TEMP_SERVER_MARK in cmd and parent != flow_pid]


def test_dask_workers_report_to_the_flows_prefect_server_and_stop_with_it(tmp_path, prefect_server):
    """A `gdro rollout` on its own temporary Prefect server: the Dask workers report to that server (they start
    none of their own, ~100 s each), SIGTERM ends the stage and every worker, and the rerun reuses the shards they
    finished."""
    _needs("prefect_dask", "prefect-dask")
    import psutil

    root = tiny_project(tmp_path / "project", {**TINY, "prompts": {**TINY["prompts"], "n_train": 12},
                                               "sampler": {**TINY["sampler"], "steps": 20, "batch_size": 4}})
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env.update({"GDRO_ROOT": str(root), "PREFECT_HOME": str(tmp_path / "prefect-home"), "OMP_NUM_THREADS": "1",
                "PATH": f"{BIN}{os.pathsep}{env['PATH']}", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"})
    cmd = [BIN / "gdro", "rollout", "--set", "scale.runner=dask", "--set", "scale.workers=2",
           "--set", "scale.threads_per_worker=1"]
    records = root / "data" / "rollouts" / "records"
    seen: dict = {}
    stop = threading.Event()
    log = tmp_path / "rollout.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
        watch = threading.Thread(target=_descendants, args=(proc.pid, seen, stop), daemon=True)
        watch.start()
        deadline = time.monotonic() + 300
        while not (records / "shard-0001.json").is_file():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no rollout shard in 300 s:\n" + log.read_text()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            psutil.Process(proc.pid).kill()
            raise AssertionError("gdro rollout on Dask still ran 30 s after SIGTERM") from None
    stop.set()
    watch.join()
    assert code != 0, log.read_text()[-3000:]
    assert any("spawn_main" in c for _, c, _ in seen.values()), sorted(c for _, c, _ in seen.values())  # workers ran
    assert not _worker_servers(seen, proc.pid)  # only the flow's own temporary server, none per worker
    deadline = time.monotonic() + 10
    while _still_running(seen) and time.monotonic() < deadline:
        time.sleep(0.2)
    orphans = _still_running(seen)
    for line in orphans:
        with contextlib.suppress(psutil.Error):
            psutil.Process(int(line.split(":")[0])).kill()
    assert not orphans, orphans
    kept = {p.name: p.stat().st_mtime_ns for p in records.glob("shard-*.json")}
    assert kept and not (root / "data" / "rollouts" / "manifest.json").exists()

    from flows.rollout import rollout_flow

    in_project(root, rollout_flow)  # the rerun, in this process, serially: reusing a shard does not depend on where
    # it was sampled
    assert {n: (records / n).stat().st_mtime_ns for n in kept} == kept  # the kept shards were reused
    assert (root / "data" / "rollouts" / "manifest.json").is_file()
