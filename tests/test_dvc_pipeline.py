"""dvc.yaml drives the same flows: a second repro does no work; a train param makes train stale and nothing
above it; a code edit trains anew; invalid params stop it before any output is deleted; rounds/dvc.yaml runs later rounds
after the first. (That every stage run again writes the same bytes is tests/test_pipeline_e2e.py's: the pipeline flow
against this repro.)

The first repro runs once per session (conftest ``reproduced``). Each test is a chain of `dvc` commands on its own
copy of that project, and the module's chains run two at a time (``chains``): each test waits for its own, whose
assertions fail in that test."""

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import dvc_copy, run_ok as run, started_together, wait_all

BIN = Path(sys.executable).parent


def repro_is_incremental(path, env, first):
    for stage in ("check", "prompts", "base", "rollout", "score", "train", "evaluate"):
        assert f"Running stage '{stage}'" in first
    assert not any("@" in stage for stage in ran_stages(first))  # the root file never runs a later round
    assert not (path / "data" / "rounds").exists()
    metrics = yaml.safe_load((path / "reports" / "metrics.json").read_text())
    assert {"base", "trained", "ceiling"} <= set(metrics)

    second = run([BIN / "dvc", "repro"], path, env)
    assert "Running stage" not in second  # in a copy of the project too: DVC keys its state on content

    # a train param makes train stale and nothing above it (evaluate follows from train's new outputs, as DVC reruns
    # any stage whose inputs changed; the first repro ran it); `check` validates every params change first
    text = (path / "params.yaml").read_text()
    params = yaml.safe_load(text)
    params["train"]["beta"] = 6.0
    (path / "params.yaml").write_text(yaml.safe_dump(params))
    assert stale(path, env) == {"train"}
    (path / "params.yaml").write_text(text)

    # a code change reruns the stages that run that code, and training starts over: a checkpoint made by
    # other code with the same params is never resumed (before, train resumed at its last step and kept the old adapter)
    objective = path / "gdro_core" / "objectives" / "group_loss.py"
    objective.write_text(objective.read_text() + "\n# edited\n")
    third = run([BIN / "dvc", "repro", "train"], path, env)
    assert ran_stages(third) == {"check", "train"}
    assert "step 1:" in third, "train resumed a checkpoint made by the old code instead of training anew"
    assert len(list((path / "checkpoints" / "train").iterdir())) == 2  # the old code's and the new code's

    # invalid params stop repro before any output is deleted
    kept = {name: (path / "reports" / name).read_bytes() for name in ("train_summary.json", "train_curve.csv")}
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["train"]["beta"] = -1.0
    (path / "params.yaml").write_text(yaml.safe_dump(params))
    out = subprocess.run([BIN / "dvc", "repro"], cwd=path, env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "train.beta" in out.stdout + out.stderr
    assert "Running stage 'train'" not in out.stdout
    for name, content in kept.items():  # uncached reports survive: DVC never reached the train stage
        assert (path / "reports" / name).read_bytes() == content


EDITS = {  # file -> the stages an edit of it reruns (README "What reruns when you change something")
    "gdro_core/evaluation/vlm_judge.py": {"train", "evaluate"},
    "gdro_core/tasks/geneval/rules.py": set(),
    "gdro_core/tracking/registry.py": {"evaluate"},
    "gdro_core/objectives/group_loss.py": {"train"},
    "gdro_core/data/fanout.py": {"rollout", "score"},
}


def stale(path, env, dvc_file: str = "dvc.yaml") -> set[str]:
    """The stages of ``dvc_file`` that `dvc status` finds changed once `check` has rewritten the code hashes (what
    `dvc repro` would run first; the stages below them rerun when their outputs change)."""
    import json

    run([BIN / "dvc", "repro", "check"], path, env)
    return set(json.loads(run([BIN / "dvc", "status", "--json", dvc_file], path, env) or "{}"))


def a_code_edit_reruns_exactly_the_stages_that_run_that_code(path, env, first):
    assert stale(path, env) == set()
    for rel, expected in EDITS.items():
        source = path / rel
        text = source.read_text()
        source.write_text(text + "\n# edited\n")
        assert stale(path, env) == expected, rel
        source.write_text(text)
    assert stale(path, env) == set()  # every file as it was: nothing stale again


def ran_stages(log: str) -> set[str]:
    return {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")}


def rounds_file_runs_round_2_after_round_1_and_the_root_file_never_runs_it(path, env, first):
    metrics = run([BIN / "dvc", "metrics", "show", "reports/metrics.json", "reports/train_summary.json"], path, env)
    assert "rounds" not in metrics  # what `make demo` prints: round 1's metrics only

    second = run([BIN / "dvc", "repro", "rounds/dvc.yaml"], path, env)
    assert ran_stages(second) == {f"rounds/dvc.yaml:{s}@2" for s in ("rollout", "score", "train", "evaluate")}
    order = [line for line in second.splitlines() if line.startswith("Running stage")]
    assert [o.split(":")[1].split("@")[0] for o in order] == ["rollout", "score", "train", "evaluate"]
    assert "step 1:" in second, "round 2 resumed a checkpoint instead of training anew"
    assert len(list((path / "checkpoints" / "train").iterdir())) == 2  # round 1's and round 2's
    round_2 = yaml.safe_load((path / "reports" / "rounds" / "2" / "metrics.json").read_text())
    round_1 = yaml.safe_load((path / "reports" / "metrics.json").read_text())
    assert round_2["base"] == round_1["base"]  # the same held-out prompts and seeds: directly comparable
    assert (path / "models" / "rounds" / "2" / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert "reports/rounds/2/metrics.json" in run([BIN / "dvc", "metrics", "show"], path, env)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{path / 'mlflow.db'}")
    versions = {int(v.version): v.tags for v in client.search_model_versions("name='gdro-ocr-lora'")}
    assert sorted(versions) == [1, 2] and "gdro.round" not in versions[1] and versions[2]["gdro.round"] == "2"

    third = run([BIN / "dvc", "repro", "rounds/dvc.yaml"], path, env)
    assert "Running stage" not in third
    status = run([BIN / "dvc", "status"], path, env)
    assert "up to date" in status

    params = yaml.safe_load((path / "params.yaml").read_text())
    params["rounds"]["steps"] = 2  # a later round's knob reruns only that round's training and evaluation
    (path / "params.yaml").write_text(yaml.safe_dump(params))
    assert stale(path, env, "rounds/dvc.yaml") == {"rounds/dvc.yaml:train@2", "rounds/dvc.yaml:evaluate@2"}


CHAINS = [  # the longest first: two at a time, they end about together
    rounds_file_runs_round_2_after_round_1_and_the_root_file_never_runs_it,
    a_code_edit_reruns_exactly_the_stages_that_run_that_code,
    repro_is_incremental,
]


@pytest.fixture(scope="module")
def chains(request, reproduced, tmp_path_factory):
    """The selected tests' chains, each on its own copy of the reproduced project (its edits and reruns never reach
    another test), started together."""
    wanted = {item.originalname for item in request.session.items if item.module is request.module}
    work = {}
    for chain in CHAINS:
        if f"test_{chain.__name__}" in wanted:
            path, env = dvc_copy(reproduced, tmp_path_factory.mktemp("dvc") / "project")
            work[chain.__name__] = functools.partial(chain, path, env, reproduced[1])
    futures = started_together(work)
    yield futures
    wait_all(futures)


def test_repro_is_incremental(chains):
    chains["repro_is_incremental"].result()


def test_a_code_edit_reruns_exactly_the_stages_that_run_that_code(chains):
    chains["a_code_edit_reruns_exactly_the_stages_that_run_that_code"].result()


def test_rounds_file_runs_round_2_after_round_1_and_the_root_file_never_runs_it(chains):
    chains["rounds_file_runs_round_2_after_round_1_and_the_root_file_never_runs_it"].result()
