"""`gdro train` with train.num_processes = 2 starts itself under torchrun; only rank 0 writes and reports.
The suite's one two-process `gdro train` (test_training_distributed runs the training loop itself)."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import torch

from conftest import gdro_env
from test_cpu_benchmark_smoke import PARAMS, make_project

ROOT = Path(__file__).resolve().parents[1]


def test_gdro_train_on_two_processes_trains_once_and_reports_once(tmp_path, one_thread, prefect_server):
    """The documented command with `model.device: auto` on a machine without CUDA: both ranks join one job, which
    trains once (to its last step) and reports once."""
    from gdro_core.training.checkpoint import latest_checkpoint, load_checkpoint

    make_project(tmp_path)
    env = {**gdro_env(tmp_path), "OMP_NUM_THREADS": "1",  # the session's Prefect server: no temporary one to start
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([Path(sys.executable).parent / "gdro", "train", "--set", "train.num_processes=2", "--set",
                           "model.device=auto"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert (tmp_path / "models" / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    states = sorted(glob.glob(str(tmp_path / "checkpoints" / "train" / "*" / "step-*" / "state.pt")))
    assert states, "no checkpoint written"
    assert {torch.load(s, weights_only=True)["num_processes"] for s in states} == {2}  # really two ranks
    (ckpt,) = (tmp_path / "checkpoints" / "train").iterdir()
    _, state = load_checkpoint(latest_checkpoint(ckpt))
    assert state["num_processes"] == 2 and state["step"] == PARAMS["train"]["steps"]
    assert json.loads((tmp_path / "reports" / "train_summary.json").read_text())["kept_step"] >= 0
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        runs = mlflow.search_runs(experiment_names=["gdro"])
    finally:
        mlflow.set_tracking_uri(previous)
    assert list(runs["tags.gdro.stage"]) == ["train"]  # one MLflow run: rank 1 reported nothing
    assert done.stderr.count("Beginning flow run") + done.stdout.count("Beginning flow run") == 1


def test_how_the_batch_is_computed_does_not_change_the_checkpoint_directory(tmp_path):
    from gdro_core.cache_keys import train_fingerprint
    from gdro_core.layout import Layout

    lay = make_project(tmp_path)
    same = [{}, {"num_processes": 2, "gradient_accumulation_steps": 1, "gradient_checkpointing": True}]
    prints = {train_fingerprint(Layout(root=lay.root, params=lay.params.model_copy(
        update={"train": lay.params.train.model_copy(update=u)}))) for u in same}
    assert len(prints) == 1
    other = lay.params.model_copy(update={"train": lay.params.train.model_copy(update={"beta": 3.0})})
    assert train_fingerprint(Layout(root=lay.root, params=other)) not in prints
