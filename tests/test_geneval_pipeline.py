"""The real flows end to end with task: geneval on a very small configuration (real Prefect server, MLflow store)."""

import json

import pandas as pd
import pytest
import yaml

from conftest import TINY

GENEVAL_TINY = {
    **TINY,
    "task": "geneval",
    "prompts": {"n_train": 6, "n_test": 6, "n_val": 6},
    "model": {**TINY["model"], "builtin": {**TINY["model"]["builtin"], "max_tokens": 64}},
    "judge": {**TINY["judge"], "task": "geneval"},
    "evaluate": {**TINY["evaluate"], "train_prompts": 4},
}


@pytest.fixture()
def project(tmp_path, monkeypatch, prefect_server):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(GENEVAL_TINY))
    monkeypatch.setenv("GDRO_ROOT", str(tmp_path))
    return tmp_path


def test_geneval_pipeline_reports_the_per_tag_table_and_its_ceiling(project):
    from flows.pipeline import pipeline_flow

    metrics = pipeline_flow(params_path="params.yaml")
    assert json.loads((project / "reports" / "metrics.json").read_text()) == metrics
    assert metrics["ceiling"]["geneval"] >= 0.95
    for name in ("base", "trained"):
        assert 0.0 <= metrics[name]["geneval"] <= 1.0 and 0.0 <= metrics[name]["score"] <= 1.0
        assert {"tag.single_object", "tag.position", "tag.color_attr"} <= set(metrics[name])
    # the training-prompt evaluation: both models on 4 training prompts, noise no rollout drew
    for name in ("base_train", "trained_train"):
        assert metrics[name]["score"] <= 1.0 and 0.0 <= metrics[name]["geneval"] <= 1.0
    assert metrics["delta_train"]["reward"] == pytest.approx(
        metrics["trained_train"]["reward"] - metrics["base_train"]["reward"])
    assert metrics["base_train"] != metrics["base"]  # other prompts, other seeds
    per_image = pd.read_csv(project / "reports" / "eval_scores.csv")
    assert {"reward", "score", "correct", "strict", "tag", "u_hat", "corrected"} <= set(per_image.columns)
    # judge.task geneval: û is the mean of coherence and style only
    assert per_image["u_hat"].to_numpy() == pytest.approx(((per_image["coherence"] + per_image["style"]) / 2).to_numpy())
    rewards = pd.read_parquet(project / "data" / "rewards.parquet")
    # Flow-GRPO's partial credit is at most 1, below 0 where far more objects than asked were found
    assert (rewards["reward"] <= 1).all() and (rewards["reward"] == rewards["score"]).all()
    first = json.loads((project / "data" / "prompts" / "train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"tag", "include", "exclude", "prompt"}  # Flow-GRPO's metadata format
