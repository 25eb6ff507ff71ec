"""The real flows end to end on a very small configuration, with a real Prefect server and MLflow store."""

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file

from conftest import TINY


@pytest.fixture()
def project(tmp_path, monkeypatch, prefect_server):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    monkeypatch.setenv("GDRO_ROOT", str(tmp_path))
    return tmp_path


def test_pipeline_flow_runs_every_stage_and_registers_the_adapter(pipelined):
    project, metrics = pipelined  # the session's one pipeline flow run (conftest), read only
    saved = json.loads((project / "reports" / "metrics.json").read_text())
    assert saved == metrics
    for name in ("base", "trained", "ceiling"):
        assert 0.0 <= saved[name]["reward"] <= 1.0
    for name in ("base", "trained"):
        for key in ("alignment", "coherence", "style", "u_hat"):
            assert 1.0 <= saved[name][key] <= 5.0
        assert 0.0 <= saved[name]["second_reward"] <= 1.0  # the held-out images read by rapidocr as well
    assert saved["delta"]["second_reward"] == pytest.approx(saved["trained"]["second_reward"]
                                                            - saved["base"]["second_reward"])
    per_image = pd.read_csv(project / "reports" / "eval_scores.csv")
    assert per_image["corrected"].to_numpy() == pytest.approx(
        (per_image["reward"] * (per_image["u_hat"] - 3) + 0.2).to_numpy())
    trained = per_image[per_image["model"] == "trained"]
    assert saved["trained"]["corrected"] == pytest.approx(trained["corrected"].mean())
    curve = pd.read_csv(project / "reports" / "train_curve.csv")
    assert list(curve["step"]) == [0, 2, 4]  # the base, then every evaluate.checkpoint_every steps
    summary = json.loads((project / "reports" / "train_summary.json").read_text())
    assert summary["kept_step"] in (2, 4) and summary["hacking_trend"] in (True, False)
    assert saved["ceiling"]["reward"] >= 0.95  # the reader reads the world's clean renders

    table = pd.read_parquet(project / "data" / "rewards.parquet")
    assert len(table) == TINY["prompts"]["n_train"] * TINY["rollout"]["images_per_prompt"]
    assert {"reward", "exact", "similarity", "read", "seed", "target"} <= set(table.columns)

    weights = load_file(project / "models" / "adapter" / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("transformer.") and "lora_" in k for k in weights)
    assert (project / "reports" / "samples.png").stat().st_size > 0

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["gdro"])
    assert set(runs["tags.gdro.stage"]) == {"prompts", "base", "rollout", "score", "train", "evaluate"}
    assert (runs["status"] == "FINISHED").all()
    train_run = runs[runs["tags.gdro.stage"] == "train"].iloc[0]
    history = mlflow.tracking.MlflowClient().get_metric_history(train_run.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]

    version = max(mlflow.tracking.MlflowClient().search_model_versions("name='gdro-ocr-lora'"), key=lambda v: int(v.version))
    model = mlflow.pyfunc.load_model(f"models:/gdro-ocr-lora/{version.version}")
    images = model.predict(['a sign that says "123"', 'a label: "456"'])
    assert len(images) == 2 and images[0].shape == (TINY["world"]["height"], TINY["world"]["width"])


def files_under(path: Path) -> dict[str, bytes]:
    """Every file of an output (a file, or a directory's files by relative path) with its bytes."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def without_second_reader(metrics: dict) -> dict:
    """``metrics.json`` less what the second reader adds (the pipeline flow's project reads with rapidocr too)."""
    if isinstance(metrics, dict):
        return {k: without_second_reader(v) for k, v in metrics.items() if not k.startswith("second_")}
    return metrics


def test_every_stage_run_again_in_another_process_and_place_writes_dvc_repros_bytes(pipelined, reproduced):
    """The pipeline flow, run in this process in its own directory, and `dvc repro`, one process per stage in
    another: every output that dvc.lock hashes is byte for byte the same. What a rerun of every stage on unchanged
    inputs must give, whichever way it runs (`dvc repro --force`, `gdro pipeline`, a deployment)."""
    flow_root, dvc_root = pipelined[0], reproduced[0]
    lock = yaml.safe_load((dvc_root / "dvc.lock").read_text())["stages"]
    compared = set()
    for stage, entry in lock.items():
        if stage == "check":  # params validation and code hashes: `dvc repro`'s own, the pipeline flow writes none
            continue
        for out in entry["outs"]:
            want, got = files_under(dvc_root / out["path"]), files_under(flow_root / out["path"])
            assert want, f"dvc repro wrote nothing at {out['path']}"
            if out["path"] == "reports/metrics.json":
                want, got = ({k: without_second_reader(json.loads(v)) for k, v in d.items()} for d in (want, got))
            assert sorted(got) == sorted(want), out["path"]
            different = [name for name in want if got[name] != want[name]]
            assert not different, f"{stage}: {out['path']} differs from dvc repro's: {different}"
        compared.add(stage)
    assert compared == {"prompts", "base", "rollout", "score", "train", "evaluate"}


def test_failed_stage_is_marked_failed_in_mlflow_with_its_error(project):
    from flows.train import train_flow

    with pytest.raises(Exception, match="gdro rollout"):
        train_flow(params_path="params.yaml")
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["gdro"]).iloc[0]
    assert run["status"] == "FAILED"
    text = mlflow.artifacts.load_text(f"{run['artifact_uri']}/error.txt")
    assert "gdro rollout" in text


def test_bad_params_key_stops_the_cli_with_the_key_named(project, capsys):
    from flows.cli import main

    (project / "params.yaml").write_text(yaml.safe_dump({**TINY, "train": {"betta": 3}}))
    assert main(["prompts"]) == 2
    assert "unknown key 'train.betta'" in capsys.readouterr().err
