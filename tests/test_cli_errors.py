"""An expected error reaches the user once, as one line naming the fix: no traceback from Prefect before it."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import TINY

BIN = Path(sys.executable).parent


def test_a_missing_input_is_one_clear_line_without_a_traceback(tmp_path, prefect_server):
    from prefect.settings import PREFECT_API_URL

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    env = {**os.environ, "GDRO_ROOT": str(tmp_path), "PREFECT_API_URL": PREFECT_API_URL.value()}
    out = subprocess.run([BIN / "gdro", "score"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 2
    assert "gdro score: no rollouts at" in out.stderr and "run `gdro rollout` first" in out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def test_check_names_the_bad_key(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "betta": 3}}))
    out = subprocess.run([BIN / "gdro", "check"], cwd=tmp_path, env={**os.environ, "GDRO_ROOT": str(tmp_path)},
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unknown key 'train.betta'" in out.stderr
    assert not (tmp_path / "reports" / "params_check.json").exists()


def check(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "gdro", "check", *args], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "GDRO_ROOT": str(root)})


def test_an_empty_params_file_is_an_error_not_all_defaults(tmp_path):
    (tmp_path / "params.yaml").write_text("# nothing here\n")
    out = check(tmp_path)
    assert out.returncode == 2 and "params.yaml is empty" in out.stderr
    (tmp_path / "params.yaml").write_text("- train\n")
    out = check(tmp_path)
    assert out.returncode == 2 and "must hold a mapping" in out.stderr


def test_a_bad_set_value_is_named_as_given_with_set_and_shows_no_whole_section(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    out = check(tmp_path, "--set", "train.steps=abc")
    assert out.returncode == 2 and "'train.steps' (given with --set)" in out.stderr and "with --set" in out.stderr
    out = check(tmp_path, "--set", "train.beta=[1,")
    assert out.returncode == 2 and out.stderr.startswith("gdro: --set train.beta") and "Traceback" not in out.stderr
    for bad in (["--set", "train.steps"], ["--set", "=3"]):  # no KEY=VALUE: the usage error's exit code, 2
        out = check(tmp_path, *bad)
        assert out.returncode == 2 and out.stderr.startswith("gdro: --set expects KEY=VALUE"), out.stderr
    out = check(tmp_path, "--set", "train.group_size=9")  # a rule over two sections: one line, not the whole mapping
    assert out.returncode == 2 and "exceeds rollout.images_per_prompt" in out.stderr
    assert len(out.stderr) < 600, out.stderr


def test_a_stage_refuses_bad_params_before_starting_a_prefect_server(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    out = subprocess.run([BIN / "gdro", "rollout", "--set", "sampler.steps=abc"], cwd=tmp_path, capture_output=True,
                         text=True, env={**env, "GDRO_ROOT": str(tmp_path), "PREFECT_HOME": str(tmp_path / ".prefect")},
                         timeout=60)
    assert out.returncode == 2 and "'sampler.steps' (given with --set)" in out.stderr
    assert "temporary server" not in out.stdout + out.stderr.lower()


def test_an_unknown_reward_name_is_one_line_from_check_and_stages(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**TINY, "rewards": {"weights": {"ocr": 0.8, "contrast": 0.2}}}))
    for command in ("check", "stages"):
        out = subprocess.run([BIN / "gdro", command], cwd=tmp_path, capture_output=True, text=True,
                             env={**os.environ, "GDRO_ROOT": str(tmp_path)})
        assert out.returncode == 2, (command, out.stderr[-2000:])
        assert f"gdro {command}: unknown reward 'contrast' in rewards.weights" in out.stderr, out.stderr[-2000:]
        assert "Traceback" not in out.stderr
    assert not (tmp_path / "reports" / "params_check.json").exists()


def test_targets_too_long_for_the_world_image_are_refused_before_anything_runs(tmp_path):
    """Five digits at the default font are 59 px wide in a 48-px image: every render would be clipped."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**TINY, "world": {**TINY["world"], "max_len": 5}}))
    out = check(tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "world.max_len 5: a target of 5 characters is up to 59 px wide" in out.stderr
    assert "raise world.width to at least 61" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "reports" / "params_check.json").exists()


def test_a_bad_sweep_grid_is_one_line_before_any_flow_or_server_starts(tmp_path):
    """A misspelt or mistyped sweep key is named by config and key, without the flow run's traceback (and without
    the temporary Prefect server it would start: no PREFECT_API_URL here)."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(GDRO_ROOT=str(tmp_path), PREFECT_HOME=str(tmp_path / ".prefect"))
    for grid, said in (("train.bta=1,2", "sweep config 'bta1'"), ("train.beta=a,b", "'train.beta'")):
        out = subprocess.run([BIN / "gdro", "sweep", "--grid", grid, "--name", "t"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and out.stderr.startswith("gdro sweep: ") and said in out.stderr, out.stderr
        assert "Traceback" not in out.stdout + out.stderr and "Starting temporary server" not in out.stdout + out.stderr


def test_stages_write_says_which_named_reward_file_it_could_not_track(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**TINY, "rewards": {"weights": {"ocr": 1.0,
                                                                                          "mine.py:Ink": 1.0}}}))
    out = subprocess.run([BIN / "gdro", "stages", "--write"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "GDRO_ROOT": str(tmp_path)})
    assert out.returncode == 0 and (tmp_path / "dvc.yaml").is_file()
    assert "gdro stages: reward 'mine.py:Ink': no file mine.py" in out.stderr, out.stderr
