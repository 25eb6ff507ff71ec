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

from gdro_core.params import parse_params
from gdro_core.tracking.compare import collect_versions, compare_report, pick_champion, set_champion
from gdro_core.tracking.data_version import dvc_md5

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


def use_store(tmp_path, experiment):
    """A store in ``tmp_path`` whose artifacts go there too (not into ./mlruns)."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment(experiment_id=mlflow.create_experiment(
        experiment, artifact_location=(tmp_path / "mlartifacts").as_uri()))


def _version(client, name, metrics, params=None):
    """A registered version with a model's files: ``MLmodel`` and the adapter weights."""
    with mlflow.start_run() as run:
        mlflow.log_metrics(metrics)
        mlflow.log_params(params or {"train.beta": 12.0})
        mlflow.log_text("flavors: {python_function: {artifacts: {adapter: {path: artifacts/adapter}}}}\n",
                        "adapter/MLmodel")
        mlflow.log_text("", "adapter/artifacts/adapter/pytorch_lora_weights.safetensors")
    return client.create_model_version(name, f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id)


def test_champion_is_the_best_corrected_score_else_the_best_reward(tmp_path):
    use_store(tmp_path, "registry-test")
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
    text, plot, notes = compare_report(params, tmp_path, tmp_path / "cmp" / "versions.png")
    assert notes == []
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


def test_a_mistyped_predict_param_is_refused_naming_it_and_the_accepted_ones(tmp_path, one_thread):
    from gdro_core.models import load_model
    from gdro_core.models.builtin import build_builtin_pipeline
    from gdro_core.models.families import add_lora
    from gdro_core.tracking.registry import log_adapter_model

    params = parse_params({**TINY, "tracking": {"registered_model": "typo"}})
    build_builtin_pipeline(params.model.builtin, params.image_shape, params.sampler.shift, seed=0).save_pretrained(
        tmp_path / "base")
    model = load_model(params, tmp_path / "base")
    add_lora(model.transformer, params.train.lora)
    model.save_adapter(tmp_path / "adapter")
    use_store(tmp_path, "typo")
    with mlflow.start_run():
        info = log_adapter_model(params, tmp_path / "adapter", tmp_path / "base", "typo")
    pyfunc = mlflow.pyfunc.load_model(f"models:/typo/{info.registered_model_version}")
    prompt = ['a sign that says "123"']
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"unknown predict param\(s\) 'sed'.*seed, steps, guidance"):
        pyfunc.predict(prompt, params={"sed": 123})
    with pytest.raises(mlflow.exceptions.MlflowException, match="'step'"):
        pyfunc.predict(prompt, params={"seed": 1, "step": 2})
    (image,) = pyfunc.predict(prompt, params={"seed": 123, "steps": 2})
    assert image.shape == (TINY["world"]["height"], TINY["world"]["width"])

    # its adapter weights deleted from the store: the version is named broken, and loading it says how to restore it
    from mlflow.utils.file_utils import local_file_uri_to_path

    from gdro_core.tracking.compare import missing_artifacts

    client = mlflow.MlflowClient()
    assert missing_artifacts(client, "typo", info.registered_model_version) == ""
    stored = Path(local_file_uri_to_path(client.get_model_version_download_uri("typo", info.registered_model_version)))
    (stored / "artifacts" / "adapter" / "pytorch_lora_weights.safetensors").unlink()
    assert "no adapter weights" in missing_artifacts(client, "typo", info.registered_model_version)
    with pytest.raises(FileNotFoundError, match=r"adapter weights are gone .*gdro evaluate.*retire the version"):
        mlflow.pyfunc.load_model(f"models:/typo/{info.registered_model_version}")


def test_a_version_whose_files_are_gone_is_named_with_the_fix_and_never_kept_champion(tmp_path, capsys, monkeypatch):
    import shutil

    from mlflow.utils.file_utils import local_file_uri_to_path

    from flows.cli import main
    from gdro_core.tracking.compare import MISSING

    use_store(tmp_path, "broken")
    client = mlflow.MlflowClient()
    client.create_registered_model("m")
    rank_by = ["trained.corrected", "trained.reward"]
    first = _version(client, "m", {"trained.corrected": 0.5})
    _version(client, "m", {"trained.corrected": 0.3})
    assert set_champion(client, "m", rank_by) == (1, "trained.corrected")

    def files(version):  # where the version's files are on disk
        return Path(local_file_uri_to_path(client.get_model_version_download_uri("m", version)))

    (files(first.version) / "artifacts" / "adapter" / "pytorch_lora_weights.safetensors").unlink()
    params = parse_params({"tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "registered_model": "m"}})
    text, _, notes = compare_report(params, tmp_path, tmp_path / "cmp" / "versions.png")
    assert notes[0].startswith("version 1 of 'm' is broken: no adapter weights")
    assert "`gdro evaluate`, or `dvc repro --force evaluate`" in notes[0] and "delete_model_version('m', '1')" in notes[0]
    assert notes[1] == "champion was the broken version 1: moved to version 2"
    assert {k: int(v) for k, v in client.get_registered_model("m").aliases.items()} == {"champion": 2}
    rows = {line.split()[0]: line for line in text.splitlines()[2:]}
    assert MISSING in rows["1"] and "champion" not in rows["1"] and "champion" in rows["2"]
    assert set_champion(client, "m", rank_by) == (2, "trained.corrected")  # a new evaluate skips it too

    shutil.rmtree(files("2"))  # the whole folder: MLflow alone says "No such artifact: ''"
    monkeypatch.setenv("GDRO_ROOT", str(tmp_path))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tracking": {"registered_model": "m"}}))
    assert main(["compare"]) == 1
    err = capsys.readouterr().err
    assert "version 2 of 'm' is broken: no model files at" in err
    assert "champion was the broken version 2: removed (no intact version left)" in err
    assert client.get_registered_model("m").aliases == {}


def test_outputs_without_their_tracking_store_are_named_with_how_to_register_again(tmp_path, capsys, monkeypatch):
    from flows.cli import main

    monkeypatch.setenv("GDRO_ROOT", str(tmp_path))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "metrics.json").write_text('{"trained": {"reward": 0.5}}')  # evaluate ran, mlflow.db gone
    assert main(["check"]) == 0  # a warning: check is the first stage and must not stop the repro
    err = capsys.readouterr().err
    assert f"warning: the tracking store sqlite:///{tmp_path / 'mlflow.db'} is gone while" in err
    assert "`dvc repro` reuses the outputs and registers nothing" in err and "`gdro evaluate`" in err
    assert "dvc repro --force evaluate" in err and not (tmp_path / "mlflow.db").exists()  # check creates no store

    assert main(["compare"]) == 1
    captured = capsys.readouterr()
    assert "no registered versions of 'gdro-ocr-lora'" in captured.out
    assert "has no registered version of 'gdro-ocr-lora' while" in captured.err
    assert "register the trained adapter again with `gdro evaluate` (or `dvc repro --force evaluate`)" in captured.err
    (tmp_path / "reports" / "metrics.json").unlink()  # nothing evaluated yet: the usual advice, exit 0
    assert main(["compare"]) == 0
    assert "registers one per trained adapter" in capsys.readouterr().out


def test_the_registered_model_class_gives_mlflow_no_cause_to_warn():
    """MLflow checks ``predict``'s type hints when the class is defined, and warned in every stage that imports it."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-W", "always", "-c", "import gdro_core.tracking.registry"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "type hint" not in out.stderr, out.stderr[-2000:]
