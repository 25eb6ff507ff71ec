"""dvc.yaml's deps cover the code each stage runs, so a code change reruns exactly the stages it affects."""

from pathlib import Path

import pytest
import yaml

from import_closure import ROOT, stage_closure
from gdro_core.code_version import code_hash, stage_code_paths

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
ROUNDS = yaml.safe_load((ROOT / "rounds" / "dvc.yaml").read_text())["stages"]
"""rounds/dvc.yaml: each stage a ``foreach`` over the rounds, its body under ``do`` (run from the root: wdir ..)."""


def entries(spec: dict, key: str) -> list[str]:
    return [d if isinstance(d, str) else next(iter(d)) for d in spec.get(key, [])]


def dep_paths(stage: str) -> list[Path]:
    return [ROOT / d for d in entries(STAGES[stage], "deps")]


def code_deps(spec: dict) -> set[str]:
    return {d for d in entries(spec, "deps") if Path(d).parts[0] in ("gdro_core", "flows")}


def covered(path: Path, deps: list[Path]) -> bool:
    return any(path == d or d in path.parents for d in deps)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_module_a_stage_can_import_is_a_dep(stage):
    deps = dep_paths(stage)
    missing = sorted(str(f.relative_to(ROOT)) for f in stage_closure(stage) if not covered(f, deps))
    assert not missing, f"stage {stage!r} runs code that is not among its deps in dvc.yaml: {missing}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_first_validates_params(stage):
    if stage != "check":
        assert ROOT / "reports/params_check.json" in dep_paths(stage)


def test_model_params_rerun_every_stage_that_runs_the_model():
    for stage in ("rollout", "train", "evaluate"):
        assert "model" in STAGES[stage]["params"], stage


def test_closure_sees_imports_inside_functions():
    # make_judge imports the VLM judge only when asked for it: a change there must still rerun train
    assert ROOT / "gdro_core/evaluation/vlm_judge.py" in stage_closure("train")


def test_code_hash_follows_the_stage_deps(tmp_path):
    (tmp_path / "gdro_core").mkdir()
    (tmp_path / "gdro_core" / "a.py").write_text("x = 1\n")
    (tmp_path / "gdro_core" / "b.py").write_text("y = 1\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(
        {"stages": {"train": {"cmd": "gdro train", "deps": ["data/rollouts", "gdro_core/a.py"]}}}
    ))
    assert stage_code_paths("train", tmp_path) == [tmp_path / "gdro_core" / "a.py"]
    before = code_hash("train", tmp_path)
    (tmp_path / "gdro_core" / "b.py").write_text("y = 2\n")  # not a dep of train
    assert code_hash("train", tmp_path) == before
    (tmp_path / "gdro_core" / "a.py").write_text("x = 2\n")
    assert code_hash("train", tmp_path) != before


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_params_name_params_yaml_keys(stage):
    from gdro_core.params import Params

    for entry in STAGES[stage].get("params", []):
        key = entry if isinstance(entry, str) else next(iter(entry))
        if key == "params.yaml":
            continue
        assert key.split(".")[0] in Params.model_fields, f"stage {stage!r} lists {key!r} under params: not a param"


@pytest.mark.parametrize("stage", sorted(ROUNDS))
def test_a_later_round_runs_its_root_stage_with_the_same_code_deps(stage):
    # a round reruns the root stage's command with --round, so its code is that stage's code (covered above)
    body = ROUNDS[stage]["do"]
    assert body["cmd"] == f"gdro {stage} --round ${{key}}" and body["wdir"] == ".."
    assert code_deps(body) == code_deps(STAGES[stage]), f"rounds/dvc.yaml {stage!r}: code deps differ from dvc.yaml's"
    assert "reports/params_check.json" in entries(body, "deps")
    root_params = set(entries(STAGES[stage], "params"))
    assert root_params <= set(entries(body, "params")), f"rounds/dvc.yaml {stage!r} misses params the stage reads"
    for key in entries(body, "params"):
        from gdro_core.params import Params

        assert key.split(".")[0] in Params.model_fields, key


def test_a_later_round_depends_on_the_previous_rounds_adapter_and_writes_its_own_outputs():
    rollout, train = ROUNDS["rollout"]["do"], ROUNDS["train"]["do"]
    assert "${item}" in entries(rollout, "deps") and "${item}" in entries(train, "deps")  # previous round's adapter
    outs = {o for s in ROUNDS.values() for key in ("outs", "metrics") for o in entries(s["do"], key)}
    root_outs = {o for s in STAGES.values() for key in ("outs", "metrics", "plots") for o in entries(s, key)}
    assert all("rounds/${key}/" in o for o in outs) and not outs & root_outs
