"""dvc.yaml drives the same flows: a second repro does no work; a train param reruns train + evaluate only."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY
from gdro_core.params import parse_params

BIN = Path(sys.executable).parent


def run(cmd, cwd, env):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.fixture()
def dvc_project(tmp_path, prefect_server):
    from prefect.settings import PREFECT_API_URL

    shutil.copy(ROOT / "dvc.yaml", tmp_path)
    shutil.copytree(ROOT / "gdro_core", tmp_path / "gdro_core", ignore=shutil.ignore_patterns("__pycache__"))
    # dvc reads params.yaml itself: write every key (the defaults too), not just the tiny overrides
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(parse_params(TINY).model_dump()))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "PREFECT_API_URL": PREFECT_API_URL.value(), "GDRO_ROOT": str(tmp_path)}
    run(["git", "init", "-q"], tmp_path, env)
    run([BIN / "dvc", "init", "-q"], tmp_path, env)
    return tmp_path, env


def test_repro_is_incremental(dvc_project):
    path, env = dvc_project
    first = run([BIN / "dvc", "repro"], path, env)
    for stage in ("prompts", "base", "rollout", "score", "train", "evaluate"):
        assert f"Running stage '{stage}'" in first
    metrics = yaml.safe_load((path / "reports" / "metrics.json").read_text())
    assert {"base", "trained", "ceiling"} <= set(metrics)

    second = run([BIN / "dvc", "repro"], path, env)
    assert "Running stage" not in second

    params = yaml.safe_load((path / "params.yaml").read_text())
    params["train"]["beta"] = 6.0
    (path / "params.yaml").write_text(yaml.safe_dump(params))
    third = run([BIN / "dvc", "repro"], path, env)
    ran = {line.split("'")[1] for line in third.splitlines() if line.startswith("Running stage")}
    assert ran == {"train", "evaluate"}
