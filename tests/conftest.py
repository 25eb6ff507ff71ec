import importlib.util
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
# One torch thread per process unless the caller says otherwise, in this process and every `gdro`/`dvc` one the tests
# start: the tiny models gain nothing from a second thread, and the suite runs two stage processes at a time in places,
# where threads that spin waiting for each other on two cores only slow both down.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from gdro_core.params import Params, load_params, parse_params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "world": {"height": 24, "width": 48},
    "prompts": {"n_train": 4, "n_test": 4, "n_val": 2},
    "model": {"device": "cpu", "builtin": {"layers": 2, "heads": 2, "head_dim": 16, "text_dim": 32, "text_layers": 1}},
    "pretrain": {"steps": 6, "batch_size": 4, "checkpoint_every": 3, "log_every": 2},
    "sampler": {"steps": 3, "batch_size": 16},
    "rollout": {"images_per_prompt": 4},
    "train": {"group_size": 3, "groups_per_step": 2, "steps": 4, "checkpoint_every": 2, "log_every": 1,
              "lora": {"rank": 4, "alpha": 4.0}},
    "evaluate": {"grid_prompts": 4, "checkpoint_every": 2, "checkpoint_prompts": 2, "second_reader": "none",
                 "bootstrap_samples": 200},
    "judge": {"reference_images": 16},
}


LONGEST_FIRST = (  # modules of whole `gdro`/`dvc` runs, longest first (`make test` prints the slowest tests); the
    # ones that wait for the session's reproduced project (test_dvc_pipeline builds it) come after others
    "test_dvc_pipeline.py", "test_fanout.py", "test_families_pipeline.py", "test_serve_stop.py", "test_serve.py",
    "test_stop_signals.py", "test_tracking_faults.py", "test_rewards.py", "test_training_launch.py",
    "test_repro_tracking.py", "test_cli_errors.py", "test_repro_kill.py", "test_rounds.py",
)


def pytest_collection_modifyitems(items) -> None:
    """`make test` hands whole modules to its workers (pytest-xdist ``--dist loadfile --no-loadscope-reorder``) in
    collection order: the longest go first, so the workers end together instead of one finishing a long module
    alone."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: every other module keeps its order


@pytest.fixture(scope="session")
def default_params() -> Params:
    return load_params(ROOT / "params.yaml")


@pytest.fixture()
def tiny_params() -> Params:
    return parse_params(TINY, "tiny test params")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One real (temporary, local) Prefect server for the whole test session."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (a script, not a package) so its tests can call ``main`` in-process."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared CPU: more threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_project(root: Path, params: dict) -> Path:
    """A project root with ``params``, its prompt sets and a small random built-in base at ``models/base``."""
    from flows.prompts import prompts_flow
    from gdro_core.models.builtin import build_builtin_pipeline

    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    p = parse_params(params)
    mp = pytest.MonkeyPatch()
    mp.setenv("GDRO_ROOT", str(root))
    try:
        prompts_flow(params_path="params.yaml")
    finally:
        mp.undo()
    build_builtin_pipeline(p.model.builtin, p.image_shape, p.sampler.shift, seed=0).save_pretrained(root / "models" / "base")
    return root


def copy_project(src: Path, dest: Path) -> Path:
    """A copy of a project that owns its MLflow artifacts: ``mlflow.db`` stores absolute artifact URIs, so
    without the rewrite the copy's runs would write into (and read from) the original's ``mlartifacts``."""
    shutil.copytree(src, dest)
    db = dest / "mlflow.db"
    if db.is_file():
        with sqlite3.connect(db) as con:
            for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                for column in con.execute(f"PRAGMA table_info('{table}')").fetchall():
                    if column[2].upper().startswith(("TEXT", "VARCHAR")):
                        con.execute(f'UPDATE "{table}" SET "{column[1]}" = replace("{column[1]}", ?, ?)',
                                    (str(src), str(dest)))
    return dest


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], what: str, timeout: float = 300.0,
              poll: float = 0.02) -> None:
    """SIGKILL ``proc`` as soon as ``ready()``; fails if it ends first (nothing was interrupted) or never gets there."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"{what} finished before it could be interrupted"
        assert time.monotonic() < deadline, f"{what} did not reach the kill point in {timeout:.0f} s"
        time.sleep(poll)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def gdro_env(root: Path) -> dict[str, str]:
    """The environment `gdro` commands of a test project run in: this venv, ``root``, the session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    bin_dir = Path(sys.executable).parent
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "GDRO_ROOT": str(root),
            "PREFECT_API_URL": PREFECT_API_URL.value()}


def started_together(work: dict[str, Callable[[], object]], at_once: int = 2) -> dict[str, Future]:
    """Each of ``work``'s calls started on a thread, ``at_once`` at a time; ``.result()`` waits for one and re-raises its
    failure (an assertion error with pytest's message) in the test that asks. Meant for chains of `gdro`/`dvc` processes
    that are independent of each other: each stage process is mostly single-threaded (cold imports, a tiny model),
    so on a two-core machine two chains take little longer than one."""
    pool = ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="chain")
    futures = {name: pool.submit(call) for name, call in work.items()}
    pool.shutdown(wait=False)
    return futures


def wait_all(futures: dict[str, Future]) -> None:
    """At a fixture's teardown: no chain left running into the next module (their outcome is their test's)."""
    for future in futures.values():
        future.cancel()
    for future in futures.values():
        if not future.cancelled():
            future.exception()


def run_ok(cmd: list, cwd: Path, env: dict[str, str]) -> str:
    """Run ``cmd``; fails the test with the end of its output unless it exits 0. Returns stdout + stderr."""
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))}: " + out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def dvc_env(root: Path) -> dict[str, str]:
    """The environment of `dvc` commands in a project made by :func:`dvc_project_at`: its stages run its own copy
    of the code (``PYTHONPATH``), so a test may edit that copy."""
    return {**gdro_env(root), "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(root)}


def dvc_project_at(root: Path, params: dict) -> dict[str, str]:
    """A git + DVC project at ``root`` with dvc.yaml, the rounds file, a copy of the code and ``params`` (every key,
    the defaults too: dvc reads params.yaml itself); nothing run yet. Returns its :func:`dvc_env`."""
    root.mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", root)
    (root / "rounds").mkdir()
    shutil.copy(ROOT / "rounds" / "dvc.yaml", root / "rounds")
    for code in ("gdro_core", "flows", "prompt_files"):  # every dep path dvc.yaml names
        shutil.copytree(ROOT / code, root / code, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "params.yaml").write_text(yaml.safe_dump(parse_params(params).model_dump()))
    env = dvc_env(root)
    run_ok(["git", "init", "-q"], root, env)
    run_ok([Path(sys.executable).parent / "dvc", "init", "-q"], root, env)
    return env


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> object:
    """``build(root)``'s result for a project the tests only read or copy, built once per test run.

    Under pytest-xdist every worker runs its own session fixtures; the first worker to ask builds the project in the
    run's shared temporary directory while holding a file lock, and the others wait and read its JSON result. A
    failed build leaves nothing behind, so the next worker to ask tries again (and fails with its own message)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return json.loads(json.dumps(build(tmp_path_factory.mktemp(name))))
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent / name
    done = root.with_name(name + ".json")
    with FileLock(str(root) + ".lock"):
        if not done.is_file():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            done.write_text(json.dumps(build(root)))
    return json.loads(done.read_text())


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory, prefect_server) -> tuple[Path, str]:
    """The tiny project after its first `dvc repro` (what `make demo` runs), made once per test run: its path and
    the repro's output. Read it; a test that writes works on its own copy (:func:`dvc_copy`)."""
    def build(root: Path) -> tuple[str, str]:
        env = dvc_project_at(root / "project", TINY)
        return str(root / "project"), run_ok([Path(sys.executable).parent / "dvc", "repro"], root / "project", env)

    path, out = built_once(tmp_path_factory, "reproduced", build)
    return Path(path), out


def dvc_copy(reproduced: tuple[Path, str], dest: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the reproduced project that a test may change and rerun, and the environment of its commands."""
    path = copy_project(reproduced[0], dest)
    return path, dvc_env(path)


def in_project(root: Path, *flows: Callable) -> list:
    """Each of ``flows`` called in this process on the project at ``root`` (its params.yaml); their results."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GDRO_ROOT", str(root))
    try:
        return [flow(params_path="params.yaml") for flow in flows]
    finally:
        mp.undo()


@pytest.fixture(scope="session")
def scored(tmp_path_factory, prefect_server) -> Path:
    """A tiny project (``TINY``) whose prompts, base, rollouts and reward table are made once per session, by the
    stage flows in this process. Its train and evaluate have not run; copy it (:func:`scored_copy`) to use it."""
    from flows.base import base_flow
    from flows.prompts import prompts_flow
    from flows.rollout import rollout_flow
    from flows.score import score_flow

    def build(parent: Path) -> str:
        root = parent / "project"
        root.mkdir()
        (root / "params.yaml").write_text(yaml.safe_dump(TINY))
        in_project(root, prompts_flow, base_flow, rollout_flow, score_flow)
        return str(root)

    return Path(built_once(tmp_path_factory, "scored", build))


def scored_copy(scored: Path, dest: Path, params: dict | None = None) -> dict[str, str]:
    """A copy of the :func:`scored` project at ``dest``, with ``params`` (which may change what train and evaluate
    do, not the data) as its params.yaml; returns the environment of `gdro` commands run there."""
    copy_project(scored, dest)
    if params is not None:
        for section in ("world", "prompts", "model", "pretrain", "sampler", "rollout", "reward", "task"):
            assert params.get(section) == TINY.get(section), f"{section} would change the scored data"
        (dest / "params.yaml").write_text(yaml.safe_dump(params))
    return gdro_env(dest)


@pytest.fixture(scope="session")
def pipelined(tmp_path_factory, prefect_server) -> tuple[Path, dict]:
    """The tiny project after the whole pipeline flow ran once in this process: its root and the metrics the flow
    returned. Read it; a test that writes works on a copy (:func:`copy_project`)."""
    from flows.pipeline import pipeline_flow

    def build(parent: Path) -> tuple[str, dict]:
        root = parent / "project"
        root.mkdir()
        params = {**TINY, "evaluate": {**TINY["evaluate"], "second_reader": "auto"}}  # rapidocr reads the held-out too
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        (metrics,) = in_project(root, pipeline_flow)
        return str(root), metrics

    root, metrics = built_once(tmp_path_factory, "pipelined", build)
    return Path(root), metrics
