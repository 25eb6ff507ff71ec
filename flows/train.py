"""Stage `train`: GDRO (or another offline objective) on the cached groups, LoRA through peft."""

from __future__ import annotations

import shutil
from typing import Any

import mlflow
import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.context import load_layout
from gdro_core.flow_model import load_flow_model
from gdro_core.layout import Layout
from gdro_core.lora import save_adapter
from gdro_core.rollout import load_rollouts
from gdro_core.scoring import reward_matrix
from gdro_core.store import fingerprint, read_json, sha256_file
from gdro_core.tracking import metric_logger, stage_run
from gdro_core.training import train


def train_fingerprint(lay: Layout) -> str:
    p = lay.params
    return fingerprint(
        {
            "train": p.train.model_dump(),
            "rollouts": read_json(lay.rollout_dir / "manifest.json")["fingerprint"],
            "rewards": sha256_file(lay.rewards),
        }
    )


@task(cache_policy=NO_CACHE)
def fit_adapter(lay: Layout) -> None:
    p = lay.params
    logger = get_run_logger()
    data = load_rollouts(lay.rollout_dir)
    rewards = reward_matrix(pd.read_parquet(lay.rewards), *data.latents.shape[:2])
    model = load_flow_model(p.model.source, lay.base_dir, p.world, p.model.device, p.model.dtype)
    train(model, data, rewards, p.train, lay.checkpoints("train", train_fingerprint(lay)), metric_logger(logger.info))
    tmp = lay.adapter_dir.with_name(".adapter.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model.transformer, tmp)
    shutil.rmtree(lay.adapter_dir, ignore_errors=True)
    tmp.rename(lay.adapter_dir)


@flow(name="train")
def train_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None) -> str:
    lay = load_layout(params_path, overrides)
    with stage_run(lay.params, lay.root, "train", ("train",)):
        fit_adapter(lay)
        mlflow.log_artifacts(str(lay.adapter_dir), "adapter")
        get_run_logger().info("adapter saved to %s", lay.adapter_dir)
        return str(lay.adapter_dir)
