"""The model registry: every adapter a version with params, metrics and data version; champion; `gdro compare`."""

import math
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from conftest import TINY, copy_project
from gdro_core.tracking.compare import collect_versions, compare_report, pick_champion, set_champion
from gdro_core.tracking.data_version import dvc_md5
from gdro_core.params import parse_params

BIN = Path(sys.executable).parent


def test_data_version_is_the_hash_dvc_records(tmp_path):
    (tmp_path / "data" / "rollouts" / "images").mkdir(parents=True)
    (tmp_path / "data" / "rollouts" / "manifest.json").write_text('{"rows": []}\n')
    (tmp_path / "data" / "rollouts" / "images" / "a.png").write_bytes(bytes(range(256)))
    (tmp_path / "data" / "rewards.parquet").write_bytes(b"not really parquet\r\n")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for cmd in (["git", "init", "-q"], [BIN / "dvc", "init", "-q"],
                [BIN / "dvc", "add", "-q", "data/rollouts", "data/rewards.parquet"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)
    for name in ("rollouts", "rewards.parquet"):
        recorded = yaml.safe_load((tmp_path / "data" / f"{name}.dvc").read_text())["outs"][0]["md5"]
        assert dvc_md5(tmp_path / "data" / name) == recorded
    assert dvc_md5(tmp_path / "missing") == ""


def _version(client, name, metrics, params=None):
    with mlflow.start_run() as run:
        mlflow.log_metrics(metrics)
        mlflow.log_params(params or {"train.beta": 12.0})
    return client.create_model_version(name, f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id)


def test_champion_is_the_best_corrected_score_else_the_best_reward(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("registry-test")
    client = mlflow.MlflowClient()
    client.create_registered_model("m")
    rank_by = ["trained.corrected", "trained.reward"]
    _version(client, "m", {"trained.reward": 0.7}, {"train.beta": 3.0})
    assert set_champion(client, "m", rank_by) == (1, "trained.reward")  # no corrected score anywhere yet
    _version(client, "m", {"trained.reward": 0.9}, {"train.beta": 6.0})  # an older evaluate, reward only
    assert set_champion(client, "m", rank_by) == (2, "trained.reward")
    _version(client, "m", {"trained.reward": 0.5, "trained.corrected": 0.30, "base.corrected": 0.2},
             {"train.beta": 12.0})
    _version(client, "m", {"trained.reward": 0.8, "trained.corrected": 0.10}, {"train.beta": 24.0})
    _version(client, "m", {"trained.reward": 0.4, "trained.corrected": 0.30}, {"train.beta": 48.0})  # tie: older wins
    assert set_champion(client, "m", rank_by) == (3, "trained.corrected")
    assert {k: int(v) for k, v in client.get_registered_model("m").aliases.items()} == {"champion": 3}

    frame = collect_versions(client, "m", ["train.beta"])
    assert list(frame["version"]) == [1, 2, 3, 4, 5]
    assert list(frame["train.beta"]) == ["3.0", "6.0", "12.0", "24.0", "48.0"]
    assert math.isnan(frame.loc[0, "trained.corrected"]) and frame.loc[2, "aliases"] == "champion"
    assert pick_champion(frame, ["no.such.metric"]) == (None, None)

    params = parse_params({"tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "registered_model": "m"},
                           "registry": {"compare_params": ["train.beta"]}})
    text, plot = compare_report(params, tmp_path, tmp_path / "cmp" / "versions.png")
    lines = text.splitlines()
    assert lines[0] == "m: 5 versions, best first by trained.corrected"
    assert lines[1].split()[:3] == ["version", "aliases", "trained.reward"]
    assert [line.split()[0] for line in lines[2:]] == ["3", "5", "4", "1", "2"]  # ranked; reward-only versions last
    assert "champion" in lines[2]
    assert plot.stat().st_size > 0
    assert pd.read_csv(plot.with_suffix(".csv"))["version"].tolist() == [1, 2, 3, 4, 5]


def test_trained_adapter_is_a_version_with_params_metrics_and_data_version_loadable_as_champion(pipelined, tmp_path,
                                                                                            monkeypatch, capsys):
    from flows.cli import main

    project = copy_project(pipelined[0], tmp_path / "project")  # the session's pipeline flow run; compare writes
    metrics = pipelined[1]
    monkeypatch.setenv("GDRO_ROOT", str(project))
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    (version,) = client.search_model_versions("name='gdro-ocr-lora'")
    tags = client.get_model_version("gdro-ocr-lora", version.version).tags
    assert tags["param.train.objective"] == "gdro" and "param.train.beta" not in tags  # on the source run instead
    assert len(tags) <= 16, sorted(tags)  # what identifies and ranks it, readable on MLflow's model page
    run_params = client.get_run(version.run_id).data.params
    assert run_params["train.beta"] == str(TINY.get("train", {}).get("beta", 12.0))
    assert run_params["train.group_size"] == "3"
    assert float(tags["metric.trained.reward"]) == pytest.approx(metrics["trained"]["reward"], abs=1e-5)
    assert float(tags["metric.trained.corrected"]) == pytest.approx(metrics["trained"]["corrected"], abs=1e-5)
    for name, path in (("prompts", "data/prompts"), ("rollouts", "data/rollouts"), ("rewards", "data/rewards.parquet"),
                       ("base", "models/base")):
        assert tags[f"data.{name}"] == dvc_md5(project / path) != ""
    evaluate_run = client.get_run(version.run_id)
    assert evaluate_run.data.tags["gdro.stage"] == "evaluate"
    assert evaluate_run.data.tags["data.rollouts"] == tags["data.rollouts"]
    assert {k: int(v) for k, v in client.get_registered_model("gdro-ocr-lora").aliases.items()} == {
        "champion": int(version.version)}

    model = mlflow.pyfunc.load_model("models:/gdro-ocr-lora@champion")
    images = model.predict(['a sign that says "123"', 'a label: "456"'])
    assert len(images) == 2 and images[0].shape == (TINY["world"]["height"], TINY["world"]["width"])

    assert main(["compare"]) == 0
    out = capsys.readouterr().out
    assert "gdro-ocr-lora: 1 versions, best first by trained.corrected" in out
    assert "champion" in out and "train.beta" in out
    assert (project / "reports" / "registry_versions.png").stat().st_size > 0
