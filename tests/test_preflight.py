"""`gdro check` verifies every path the configured stages will load, before anything runs or is deleted."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY
from gdro_core import preflight
from gdro_core.models.tiny import save_tiny_pipeline
from gdro_core.params import parse_params

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def sd35(tmp_path_factory) -> Path:
    return save_tiny_pipeline("sd35", tmp_path_factory.mktemp("ckpt") / "sd35")


def params(**sections):
    return parse_params({**TINY, "world": {"height": 32, "width": 48}, **sections})


def test_a_complete_checkpoint_passes_and_the_builtin_needs_nothing(sd35, tmp_path):
    assert preflight.problems(params(), tmp_path) == []
    assert preflight.problems(params(model={"source": str(sd35)}), tmp_path) == []


def test_a_placeholder_path_is_named(tmp_path):
    out = preflight.problems(params(model={"source": "/path/to/stable-diffusion-3.5-medium"}), tmp_path)
    assert len(out) == 1 and out[0].startswith("model.source: no directory /path/to/stable-diffusion-3.5-medium")


def test_an_empty_directory_says_no_model_index(tmp_path):
    (tmp_path / "empty").mkdir()
    out = preflight.problems(params(model={"source": str(tmp_path / "empty")}), tmp_path)
    assert len(out) == 1 and "no model_index.json" in out[0]


def test_a_single_file_checkpoint_says_how_to_make_its_diffusers_folder(tmp_path):
    (tmp_path / "sd3.5_medium.safetensors").write_bytes(b"")
    out = preflight.problems(params(model={"source": str(tmp_path / "sd3.5_medium.safetensors")}), tmp_path)
    assert len(out) == 1 and "is a file, not a diffusers checkpoint directory" in out[0]
    assert "from_single_file(file).save_pretrained(dir)" in out[0]


def test_a_missing_component_or_weights_file_is_named(sd35, tmp_path):
    broken = shutil.copytree(sd35, tmp_path / "broken")
    for f in (broken / "transformer").glob("*.safetensors"):
        f.unlink()
    shutil.rmtree(broken / "vae")
    out = preflight.problems(params(model={"source": str(broken)}), tmp_path)
    assert any("transformer is incomplete: no *.safetensors" in line for line in out), out
    assert any("names vae/ but it is missing" in line for line in out), out


def test_a_relative_checkpoint_path_is_taken_from_the_project_root(sd35, tmp_path):
    shutil.copytree(sd35, tmp_path / "ckpt")
    assert preflight.problems(params(model={"source": "ckpt"}), tmp_path) == []


def test_judge_detector_and_prompt_files_are_checked_when_configured(tmp_path):
    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "config.json").write_text("{}")
    out = preflight.problems(params(judge={"kind": "unified_reward", "model_path": str(tmp_path / "judge")}), tmp_path)
    assert any(line.startswith("judge.model_path") and "no *.safetensors" in line for line in out), out
    out = preflight.problems(parse_params({"task": "geneval", "geneval": {"detector": {"kind": "mask2former"}}}),
                             tmp_path)
    assert {line.split(" ")[0] for line in out} == {"geneval.detector.mask2former_path", "geneval.detector.clip_path"}
    out = preflight.problems(params(prompts={"source": "prompt_files/mine"}), tmp_path)
    assert out and out[0].startswith("prompts.source: no directory")


def test_a_missing_import_manifest_is_named_before_any_stage_runs_and_only_when_imported(tmp_path):
    imported = params(data={"source": "import", "manifest": "mine/manifest.csv"})
    (out,) = preflight.problems(imported, tmp_path)
    assert out.startswith(f"data.manifest: no manifest at {tmp_path / 'mine' / 'manifest.csv'}: ") and "gdro export" in out
    assert preflight.problems(params(data={"manifest": "mine/manifest.csv"}), tmp_path) == []  # data.source: rollout
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "manifest.csv").write_text("prompt,image,reward\n")
    assert preflight.problems(imported, tmp_path) == []  # its rows are the import stage's to check


def test_a_real_checkpoint_with_the_pixel_judge_is_warned_about(sd35):
    assert preflight.warnings(params()) == []
    assert "pixel judge" in preflight.warnings(params(model={"source": str(sd35)}))[0]


def run_check(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "gdro", "check", *args], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "GDRO_ROOT": str(root)})


@pytest.mark.parametrize("name", ["params-sd35-medium-ocr.yaml", "params-flux1-dev-ocr.yaml"])
def test_check_refuses_the_shipped_gpu_params_until_the_checkpoint_is_there(name, tmp_path):
    shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "prompt_files" / "ocr").mkdir(parents=True)
    out = run_check(tmp_path, "--params", name)
    assert out.returncode == 2 and "model.source: no directory /path/to/" in out.stderr
    assert "prompts.source: " in out.stderr and "has no train.txt" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "reports-sd35-medium").exists()


def test_check_writes_each_stages_code_hash(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    out = run_check(tmp_path)
    assert out.returncode == 0, out.stderr
    record = yaml.safe_load((tmp_path / "reports" / "code" / "train.json").read_text())
    assert record["stage"] == "train" and len(record["sha256"]) == 64
    assert "gdro_core/objectives/group_loss.py" in record["files"]
