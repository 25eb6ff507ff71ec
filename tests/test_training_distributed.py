"""Data parallelism: P processes with G/P groups each, or micro-batches, follow the one-process run with G groups."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gdro_core.params import parse_params
from gdro_core.training.loop import train
from conftest import TINY
from training_fixtures import tiny_data, tiny_model

SCRIPT = Path(__file__).parent / "scripts" / "distributed_train.py"
SETTINGS = {"groups_per_step": 4, "steps": 3, "log_every": 1, "checkpoint_every": 2}


def _run_here(overrides, ckpt):
    p = parse_params(TINY)
    logs = {}
    model = tiny_model(p)
    data, rewards = tiny_data(p)
    ema = train(model, data, rewards, p.train.model_copy(update=overrides), ckpt, lambda s, m: logs.__setitem__(s, m))
    return logs, ema


def _same_curve(a, b, rel=1e-4):
    """Equal to float32 tolerance: the margin is a difference of near-equal errors, hence the absolute 2e-5."""
    assert sorted(a) == sorted(b)
    for step in a:
        assert a[step].keys() == b[step].keys(), step
        for k in a[step]:
            assert a[step][k] == pytest.approx(b[step][k], rel=rel, abs=2e-5), (step, k)


def test_two_gloo_processes_with_half_the_groups_follow_the_one_process_loss_curve(tmp_path, one_thread):
    one, ema_one = _run_here(SETTINGS, tmp_path / "one")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           str(tmp_path / "two"), json.dumps(SETTINGS)]
    (tmp_path / "two").mkdir()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "two" / "log.json").read_text())
    assert record["num_processes"] == 2
    two = {int(s): m for s, m in record["logs"].items()}
    _same_curve({s: m for s, m in one.items()}, two)
    assert one[1]["train/loss"] != one[3]["train/loss"]  # the curve moves, so matching it means something
    ema_two = load_file(tmp_path / "two" / "ema.safetensors")
    assert ema_one.keys() == ema_two.keys()
    for k in ema_one:
        assert torch.allclose(ema_one[k], ema_two[k], atol=1e-5), k
    assert (tmp_path / "two" / "ckpt-0").is_dir() and not (tmp_path / "two" / "ckpt-1").exists()  # main writes only


def test_gradient_accumulation_follows_the_one_batch_loss_curve(tmp_path, one_thread):
    whole, ema_whole = _run_here(SETTINGS, tmp_path / "whole")
    split, ema_split = _run_here({**SETTINGS, "gradient_accumulation_steps": 2}, tmp_path / "split")
    _same_curve(whole, split)
    for k in ema_whole:
        assert torch.allclose(ema_whole[k], ema_split[k], atol=1e-6), k


def test_a_global_batch_that_does_not_split_is_refused(tiny_params):
    with pytest.raises(ValueError, match=r"groups_per_step \(2\) must divide evenly.*gradient_accumulation_steps \(4\)"):
        parse_params({**TINY, "train": {**TINY["train"], "gradient_accumulation_steps": 4}})


def test_launch_helpers_recognise_ranks_and_build_the_torchrun_command():
    from gdro_core.training.launch import is_main_rank, launched, torchrun_command

    assert not launched({}) and is_main_rank({})
    assert launched({"WORLD_SIZE": "2", "RANK": "1"}) and not is_main_rank({"WORLD_SIZE": "2", "RANK": "1"})
    cmd = torchrun_command(2, "flows.cli", ["train", "--set", "train.beta=6"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "flows.cli",
                       "train", "--set", "train.beta=6"]
    with pytest.raises(ValueError, match="at least 2 processes"):
        torchrun_command(1, "flows.cli", [])


def test_the_online_baseline_refuses_several_processes():
    with pytest.raises(ValueError, match="flow_grpo.*one process"):
        parse_params({**TINY, "train": {**TINY["train"], "objective": "flow_grpo", "num_processes": 2}})


# `gdro train` on two processes with `model.device: auto` on a CPU: test_training_launch (the suite's one such run)
