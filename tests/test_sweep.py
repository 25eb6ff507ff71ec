"""Sweeps: each config trains and evaluates on the same cached rollouts, as nested MLflow runs, in parallel."""

import json

import mlflow
import pandas as pd
import pytest
import yaml

from conftest import TINY, scored_copy
from gdro_core.tracking.data_version import dvc_md5
from gdro_core.params import ParamsError, Sweep, parse_params
from gdro_core.data.store import sha256_file
from gdro_core.sweep import (
    SweepConfig, SweepError, check_configs, config_label, config_overrides, dotted_keys, dvc_exp_commands,
    expand_grid, resolve_sweep, sweep_configs,
)


# --- pure parts -------------------------------------------------------------------------------------------------

def test_grid_expands_to_every_combination_with_readable_unique_labels():
    sweep = Sweep(grid={"train.beta": [6.0, 12.0], "train.tau": [0.0, 0.05]},
                  configs=[{"train.gamma": 0.0}, {"train.beta": 6.0, "train.tau": 0.0}])
    configs = sweep_configs(sweep)
    assert [c.values for c in configs] == [
        {"train.beta": 6.0, "train.tau": 0.0}, {"train.beta": 6.0, "train.tau": 0.05},
        {"train.beta": 12.0, "train.tau": 0.0}, {"train.beta": 12.0, "train.tau": 0.05},
        {"train.gamma": 0.0},  # the duplicate explicit config is dropped
    ]
    assert [c.label for c in configs] == ["beta6-tau0", "beta6-tau0.05", "beta12-tau0", "beta12-tau0.05", "gamma0"]
    assert expand_grid({}) == []
    assert config_label({"train.seed": 1, "evaluate.seed": 2}) == "train_seed1-evaluate_seed2"


def test_each_config_writes_its_own_adapter_and_reports():
    p = parse_params(TINY)
    out = config_overrides(p, "s1", SweepConfig("beta6", {"train.beta": 6.0}), {"train.steps": 2})
    assert out == {"train.steps": 2, "train.beta": 6.0, "paths.adapter_dir": "models/sweeps/s1/beta6",
                   "paths.reports_dir": "reports/sweeps/s1/beta6"}


def test_sweep_keys_that_would_change_the_cached_rollouts_are_refused():
    with pytest.raises(ParamsError, match=r"sweep key 'rollout.seed'.*dvc repro score"):
        parse_params({"sweep": {"grid": {"rollout.seed": [1, 2]}}})
    with pytest.raises(ParamsError, match=r"sweep grid 'train.beta' has no values"):
        parse_params({"sweep": {"grid": {"train.beta": []}}})


def test_every_config_is_checked_against_the_params_schema_before_anything_runs():
    p = parse_params(TINY)
    with pytest.raises(SweepError, match=r"(?s)sweep config 'betta6'.*unknown key 'train.betta'"):
        check_configs(p, sweep_configs(Sweep(grid={"train.betta": [6.0]})))
    with pytest.raises(SweepError, match=r"group_size \(5\) exceeds rollout.images_per_prompt \(4\)"):
        check_configs(p, sweep_configs(Sweep(grid={"train.group_size": [3, 5]})))
    with pytest.raises(SweepError, match="no configs"):
        check_configs(p, [])
    with pytest.raises(SweepError, match="max_workers"):
        resolve_sweep(p.sweep, max_workers=0)


def test_the_same_sweep_as_dvc_experiments_sets_every_swept_key_in_every_run():
    configs = sweep_configs(Sweep(grid={"train.beta": [6.0]}, configs=[{"train.tau": 0.0}]))
    commands = dvc_exp_commands(configs, "s1", {"train.beta": 12.0, "train.tau": 0.05})
    assert commands == [
        ["dvc", "exp", "run", "-n", "s1-beta6", "-S", "train.beta=6.0", "-S", "train.tau=0.05"],
        ["dvc", "exp", "run", "-n", "s1-tau0", "-S", "train.beta=12.0", "-S", "train.tau=0.0"],
    ]
    added = dvc_exp_commands(configs[:1], "s1", {}, in_file=dotted_keys({"train": {"tau": 0.05}}))
    assert added == [["dvc", "exp", "run", "-n", "s1-beta6", "-S", "++train.beta=6.0"]]


# --- the flow, with a real Prefect server and MLflow store ------------------------------------------------------

@pytest.fixture()
def cached_project(scored, tmp_path, monkeypatch):
    """A copy of the session's tiny project whose prompts, base model, rollouts and reward table are made."""
    root = tmp_path / "project"
    scored_copy(scored, root)
    monkeypatch.setenv("GDRO_ROOT", str(root))
    return root


def _runs(root):
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["gdro"])


def test_sweep_trains_every_config_on_the_cached_rollouts_as_nested_runs(cached_project):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    from flows.sweep import sweep_flow

    root = cached_project
    cached = {p: (sha256_file(p), p.stat().st_mtime_ns) for p in
              [root / "data" / "rollouts" / "manifest.json", root / "data" / "rewards.parquet",
               *sorted((root / "data" / "rollouts").glob("*.safetensors"))]}
    data_runs_before = _runs(root)["tags.gdro.stage"].isin(["rollout", "score"]).sum()

    state = sweep_flow(params_path="params.yaml", grid={"train.beta": [6.0, 24.0]}, name="s1", max_workers=2,
                       return_state=True)
    assert state.is_completed(), state.message
    results = state.result()

    # every config: its own adapter and reports; the cached rollouts and rewards untouched, never regenerated
    assert {r["label"] for r in results} == {"beta6", "beta24"}
    for label in ("beta6", "beta24"):
        assert (root / "models" / "sweeps" / "s1" / label / "pytorch_lora_weights.safetensors").is_file()
        metrics = json.loads((root / "reports" / "sweeps" / "s1" / label / "metrics.json").read_text())
        assert {"base", "trained"} <= set(metrics)
    assert {p: (sha256_file(p), p.stat().st_mtime_ns) for p in cached} == cached
    assert not (root / "models" / "adapter").exists() and not (root / "reports" / "metrics.json").exists()
    table = pd.read_csv(root / "reports" / "sweeps" / "s1" / "results.csv")
    assert set(table["label"]) == {"beta6", "beta24"}
    assert list(table["trained.corrected"]) == sorted(table["trained.corrected"], reverse=True)

    # MLflow: sweep run -> one run per config -> that config's train and evaluate runs
    runs = _runs(root)
    assert runs["tags.gdro.stage"].isin(["rollout", "score"]).sum() == data_runs_before
    sweep = runs[runs["tags.gdro.stage"] == "sweep"]
    assert len(sweep) == 1 and sweep.iloc[0]["status"] == "FINISHED"
    configs = runs[runs["tags.gdro.stage"] == "sweep-config"]
    assert set(configs["tags.mlflow.runName"]) == {"beta6", "beta24"}
    assert (configs["tags.mlflow.parentRunId"] == sweep.iloc[0]["run_id"]).all()
    assert (configs["status"] == "FINISHED").all()
    assert set(configs["params.train.beta"]) == {"6.0", "24.0"}
    for _, config in configs.iterrows():
        children = runs[runs["tags.mlflow.parentRunId"] == config["run_id"]]
        assert sorted(children["tags.gdro.stage"]) == ["evaluate", "train"]
        assert children["params.train.beta"].astype(float).unique().tolist() == [float(config["params.train.beta"])]
        assert config["metrics.trained.corrected"] == pytest.approx(
            children[children["tags.gdro.stage"] == "evaluate"].iloc[0]["metrics.trained.corrected"])

    # registry: one version per config, tagged with its data version; champion = best corrected score
    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name='gdro-ocr-lora'")
    assert len(versions) == 2
    rollouts, prompts = dvc_md5(root / "data" / "rollouts"), dvc_md5(root / "data" / "prompts")
    for v in versions:
        assert v.tags["data.rollouts"] == rollouts and v.tags["data.prompts"] == prompts
        assert client.get_run(v.run_id).data.params["train.beta"] in ("6.0", "24.0")
    scored = sorted(versions, key=lambda v: (-float(v.tags["metric.trained.corrected"]), int(v.version)))
    aliases = client.get_registered_model("gdro-ocr-lora").aliases
    assert {k: int(v) for k, v in aliases.items()} == {"champion": int(scored[0].version)}

    # Prefect: the sweep flow run and one task run per config, completed
    with get_client(sync_client=True) as prefect:
        run = prefect.read_flow_run(state.state_details.flow_run_id)
        assert run.state.is_completed()
        tasks = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])), limit=50,
                                       sort=TaskRunSort.EXPECTED_START_TIME_DESC)
        assert {t.name for t in tasks if t.name.startswith("config")} == {"config beta6", "config beta24"}
        assert all(t.state.is_completed() for t in tasks)


def test_sweep_without_cached_rollouts_fails_in_prefect_and_mlflow_saying_what_to_run(tmp_path, monkeypatch,
                                                                                      prefect_server):
    from prefect.client.orchestration import get_client

    from flows.sweep import sweep_flow

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    monkeypatch.setenv("GDRO_ROOT", str(tmp_path))
    state = sweep_flow(params_path="params.yaml", grid={"train.beta": [6.0]}, return_state=True)
    assert state.is_failed()
    with pytest.raises(SweepError, match=r"data/rollouts/manifest.json.*`dvc repro score`"):
        state.result()
    with get_client(sync_client=True) as prefect:
        assert prefect.read_flow_run(state.state_details.flow_run_id).state.is_failed()
    run = _runs(tmp_path).iloc[0]
    assert run["tags.gdro.stage"] == "sweep" and run["status"] == "FAILED"
    assert "dvc repro score" in mlflow.artifacts.load_text(f"{run['artifact_uri']}/error.txt")
