"""Every stage on a real-architecture checkpoint as ``model.source`` (tiny random weights, built in code).

SD3.5 runs through ``dvc repro`` (about 80 s on two CPU cores: each stage is a fresh process); SD3, FLUX.1-dev (the
model the GDRO paper trained) and FLUX.1-schnell run the same stage flows through the pipeline flow in-process
(about 17 s each): DVC's part does not depend on the family, and the builtin model's repros test it further."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from conftest import ROOT, TINY, started_together, wait_all
from gdro_core.models.tiny import save_tiny_pipeline
from gdro_core.params import parse_params

BIN = Path(sys.executable).parent
WORLD = {"height": 32, "width": 48}  # SD3 and FLUX need multiples of 16


def family_params(source: Path) -> dict:
    return {**TINY, "world": WORLD, "model": {"source": str(source), "device": "cpu"}}


def check_outputs(root: Path, family: str) -> None:
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    assert {"base", "trained", "delta"} <= set(metrics)
    assert "ceiling" not in metrics  # the built-in world's clean images say nothing of a real checkpoint's
    assert json.loads((root / "models" / "base" / "source.json").read_text())["family"] == family
    assert json.loads((root / "models" / "adapter" / "base.json").read_text())["family"] == family
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("gdro-ocr-lora", "champion")
    assert champion.tags["base.family"] == family and champion.tags["base.fingerprint"].startswith("sha256:")
    assert champion.tags["data.base_fingerprint"] == champion.tags["base.fingerprint"]
    runs = mlflow.search_runs(experiment_names=["gdro"]).set_index("tags.gdro.stage")
    for stage in ("rollout", "train", "evaluate"):  # every run that used the base records which one
        assert runs.loc[stage, "tags.data.base_fingerprint"] == champion.tags["base.fingerprint"]
    images = mlflow.pyfunc.load_model("models:/gdro-ocr-lora@champion").predict(['"123" on a sign'], params={"seed": 1})
    assert images[0].shape == (WORLD["height"], WORLD["width"], 3) and np.asarray(images[0]).std() > 0


DVC_VARIANTS = [("sd35", "sd3")]


def dvc_repro(project: Path, env: dict[str, str]) -> str:
    for cmd in (["git", "init", "-q"], [BIN / "dvc", "init", "-q"], [BIN / "dvc", "repro"]):
        out = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def reproduced_families(request, tmp_path_factory, prefect_server):
    """The `dvc repro` of each real-architecture project the selected tests ask for, started together (two
    chains of single-threaded stage processes); each test waits for its own and checks it."""
    from prefect.settings import PREFECT_API_URL

    wanted = {item.callspec.params["variant"] for item in request.session.items
              if item.originalname == "test_dvc_repro_runs_every_stage_on_a_real_architecture"}
    work = {}
    for variant, _ in DVC_VARIANTS:
        if variant not in wanted:
            continue
        root = tmp_path_factory.mktemp(variant)
        source = save_tiny_pipeline(variant, root / "checkpoint")
        project = root / "project"
        project.mkdir()
        shutil.copy(ROOT / "dvc.yaml", project)
        for tree in ("gdro_core", "flows", "prompt_files"):  # every dep path dvc.yaml names
            shutil.copytree(ROOT / tree, project / tree, ignore=shutil.ignore_patterns("__pycache__"))
        (project / "params.yaml").write_text(yaml.safe_dump(parse_params(family_params(source)).model_dump()))
        env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1",
               "PREFECT_API_URL": PREFECT_API_URL.value(), "GDRO_ROOT": str(project)}
        work[variant] = lambda project=project, env=env: (project, dvc_repro(project, env))
    futures = started_together(work)
    yield futures
    wait_all(futures)


@pytest.mark.parametrize("variant,family", DVC_VARIANTS)
def test_dvc_repro_runs_every_stage_on_a_real_architecture(variant, family, reproduced_families, one_thread):
    project, stdout = reproduced_families[variant].result()
    for stage in ("prompts", "base", "rollout", "score", "train", "evaluate"):
        assert f"Running stage '{stage}'" in stdout
    check_outputs(project, family)


@pytest.mark.parametrize("variant,family", [("sd3", "sd3"), ("flux-dev", "flux"), ("flux-schnell", "flux")])
def test_pipeline_flow_runs_every_stage_on_a_real_architecture(variant, family, tmp_path, monkeypatch,
                                                               prefect_server, one_thread):
    from flows.pipeline import pipeline_flow

    source = save_tiny_pipeline(variant, tmp_path / "checkpoint")
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(family_params(source)))
    monkeypatch.setenv("GDRO_ROOT", str(project))
    pipeline_flow(params_path="params.yaml")
    check_outputs(project, family)
