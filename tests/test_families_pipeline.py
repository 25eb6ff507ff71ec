"""Every stage on a real-architecture checkpoint as ``model.source`` (tiny random weights, built in code): SD3,
SD3.5, FLUX.1-dev (the model the GDRO paper trained) and FLUX.1-schnell run the stage flows through the pipeline
flow in-process (about 15 s each). DVC's part does not depend on the family: ``dvc repro`` runs the same stage
flows as fresh processes, and the built-in model's repros test it (tests/test_dvc_pipeline.py)."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from conftest import TINY
from gdro_core.models.tiny import save_tiny_pipeline

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


@pytest.mark.parametrize("variant,family", [("sd3", "sd3"), ("sd35", "sd3"), ("flux-dev", "flux"),
                                            ("flux-schnell", "flux")])
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
