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
