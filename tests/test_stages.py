"""Each stage is declared once (gdro_core/stages.py): the DVC files, code hashes, MLflow params and cache keys
follow from it, and an edit reruns exactly the stages whose code it touches."""

import shutil
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from gdro_core.dvc_files import render_dvc_yaml, render_rounds_yaml
from gdro_core.layout import Layout
from gdro_core.params import Params, parse_params
from gdro_core.code_closure import stage_code_hash, stage_files
from gdro_core.stages import ROUND_STAGES, STAGE_NAMES, STAGES, param_values, stage_params

OCR, GENEVAL = Params(), parse_params({"task": "geneval"})


def test_committed_dvc_files_are_the_generated_ones():
    for rel, text in (("dvc.yaml", render_dvc_yaml()), ("rounds/dvc.yaml", render_rounds_yaml())):
        assert (ROOT / rel).read_text() == text, f"{rel} differs from gdro_core/stages.py: run `gdro stages --write`"


def test_the_held_out_image_folders_are_an_output_of_evaluate_only_when_written():
    def outs(params, name="evaluate"):
        return [next(iter(o)) if isinstance(o, dict) else o for o in yaml.safe_load(render_dvc_yaml(params))["stages"][name]["outs"]]

    assert "reports/heldout_images" not in outs(OCR)
    assert outs(parse_params({"evaluate": {"save_images": True}}))[-1] == "reports/heldout_images"
    rounds = yaml.safe_load(render_rounds_yaml(parse_params({"evaluate": {"save_images": True}})))["stages"]
    assert "reports/rounds/${key}/heldout_images" in rounds["evaluate"]["do"]["outs"]


def test_dvc_files_are_short_and_every_stage_has_one_code_dep():
    dvc, rounds = (yaml.safe_load(render_dvc_yaml())["stages"],
                   yaml.safe_load(render_rounds_yaml())["stages"])
    lines = len(render_dvc_yaml().splitlines()) + len(render_rounds_yaml().splitlines())
    assert lines < 300, lines
    assert list(dvc) == ["check", *STAGE_NAMES] and list(rounds) == list(ROUND_STAGES)
    for name in STAGE_NAMES:
        deps = dvc[name]["deps"]
        code = [d for d in deps if str(d).startswith(("gdro_core", "flows", "reports/code"))]
        assert code == [f"reports/code/{name}.json"], (name, code)
    for name, spec in rounds.items():
        assert spec["do"]["deps"][0] == f"reports/code/{name}.json"
    check_outs = [next(iter(o)) if isinstance(o, dict) else o for o in dvc["check"]["outs"]]
    assert {f"reports/code/{n}.json" for n in STAGE_NAMES} <= set(check_outs)


def test_declared_paths_are_the_layouts():
    lay = Layout(Path("/p"), Params())
    dvc = yaml.safe_load(render_dvc_yaml())["stages"]
    assert str(lay.rollout_dir.relative_to("/p")) in dvc["rollout"]["outs"]
    assert str(lay.rewards.relative_to("/p")) in dvc["score"]["outs"]
    later = Layout(Path("/p"), Params(), round=3)
    rounds = yaml.safe_load(render_rounds_yaml())["stages"]
    assert str(later.rollout_dir.relative_to("/p")).replace("/3/", "/${key}/") in rounds["rollout"]["do"]["outs"]


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_declared_params_are_params(name):
    for round in (1, 2):
        values = param_values(OCR, stage_params(name, round, logged=True))
        assert values and all(k.split(".")[0] in Params.model_fields for k in values)


def test_the_model_params_rerun_every_stage_that_runs_the_model():
    for name in ("base", "rollout", "train", "evaluate"):
        assert "model" in stage_params(name), name


def test_what_only_evaluate_reads_never_retrains_and_what_train_keeps_by_does():
    """train's key follows the checkpoint evaluations that pick its adapter; the held-out evaluation's own settings
    change evaluate's bytes alone (a new interval or saved images must not cost a training run)."""
    def changes(section: dict) -> set[str]:
        other = parse_params({"evaluate": section})
        return {n for n in STAGE_NAMES if param_values(other, stage_params(n)) != param_values(OCR, stage_params(n))}

    for only_evaluate in ({"save_images": True}, {"bootstrap_samples": 10}, {"ci_level": 0.9}, {"grid_prompts": 4},
                          {"images_per_prompt": 3}, {"train_prompts": 8}, {"second_reader": "none"}):
        assert changes(only_evaluate) == {"evaluate"}, only_evaluate
    for picks_the_adapter in ({"checkpoint_every": 7}, {"checkpoint_prompts": 8}, {"keep": "last"}, {"tie_se": 0.0},
                              {"checkpoint_images_per_prompt": 2}, {"seed": 1}, {"hacking_window": 5},
                              {"reader_mode": "recognizer"}):
        assert changes(picks_the_adapter) == {"train", "evaluate"}, picks_the_adapter


def rel(files) -> set[str]:
    return {str(f.relative_to(ROOT)) for f in files}


def stages_running(path: str, params: Params = OCR) -> set[str]:
    return {name for name in STAGE_NAMES if path in rel(stage_files(name, params))}


def test_closure_sees_imports_inside_functions():
    # the judge imports the VLM judge only when asked for it: a change there must still rerun train
    assert "gdro_core/evaluation/vlm_judge.py" in rel(stage_files("train", OCR))


def test_each_edit_reaches_only_the_stages_that_run_it():
    """The table of issue "a change reruns only what it affects", statically."""
    assert stages_running("gdro_core/evaluation/vlm_judge.py") <= {"train", "evaluate"}
    assert stages_running("gdro_core/tracking/registry.py") == {"evaluate"}
    assert stages_running("gdro_core/objectives/group_loss.py") == {"train"}
    assert stages_running("gdro_core/data/fanout.py") == {"rollout", "score"}
    geneval = {str(f.relative_to(ROOT)) for f in (ROOT / "gdro_core/tasks/geneval").rglob("*.py")}
    assert geneval and not any(stages_running(f) for f in geneval), "GenEval code in an OCR stage"
    ocr = {str(f.relative_to(ROOT)) for f in (ROOT / "gdro_core/tasks/ocr").rglob("*.py")}
    assert not any(stages_running(f, GENEVAL) for f in ocr), "OCR code in a GenEval stage"
    assert any(stages_running(f, GENEVAL) for f in geneval)


def copy_source(dest: Path) -> Path:
    for code in ("gdro_core", "flows"):
        shutil.copytree(ROOT / code, dest / code, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_code_hash_changes_with_the_stages_own_code_only(tmp_path):
    root = copy_source(tmp_path)
    before = {name: stage_code_hash(name, OCR, root) for name in STAGE_NAMES}
    with (root / "gdro_core/objectives/group_loss.py").open("a") as f:
        f.write("# an edit\n")
    after = {name: stage_code_hash(name, OCR, root) for name in STAGE_NAMES}
    assert {n for n in STAGE_NAMES if before[n] != after[n]} == {"train"}


def test_the_task_decides_which_package_a_stage_runs():
    assert stage_code_hash("rollout", OCR) != stage_code_hash("rollout", GENEVAL)
    assert stage_code_hash("rollout", OCR) == stage_code_hash("rollout", parse_params({"train": {"beta": 3.0}}))


def test_every_stage_is_declared_once():
    assert len({s.name for s in STAGES}) == len(STAGES)
    from flows import cli, pipeline

    assert cli.STAGES == STAGE_NAMES and tuple(pipeline.STAGES) == STAGE_NAMES
