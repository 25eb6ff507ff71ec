import importlib.util
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

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
    "evaluate": {"grid_prompts": 4, "checkpoint_every": 2, "checkpoint_prompts": 2, "second_reader": "none"},
    "judge": {"reference_images": 16},
}


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


def staged_project(root: Path, params: dict, stages: tuple[str, ...]) -> dict[str, str]:
    """``params`` written to ``root`` and ``stages`` run there as `gdro` commands; returns their environment."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    env = gdro_env(root)
    for stage in stages:
        out = subprocess.run([Path(sys.executable).parent / "gdro", stage], cwd=root, env=env,
                             capture_output=True, text=True)
        assert out.returncode == 0, f"gdro {stage}: " + out.stderr[-2000:]
    return env
