import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

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
    "evaluate": {"grid_prompts": 4, "checkpoint_every": 2, "checkpoint_prompts": 2},
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
