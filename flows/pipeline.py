"""The whole pipeline as one flow: each stage runs as a subflow, in dvc.yaml's order."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.base import base_flow
from flows.evaluate import evaluate_flow
from flows.prompts import prompts_flow
from flows.rollout import rollout_flow
from flows.score import score_flow
from flows.train import train_flow

STAGES = {
    "prompts": prompts_flow,
    "base": base_flow,
    "rollout": rollout_flow,
    "score": score_flow,
    "train": train_flow,
    "evaluate": evaluate_flow,
}


@flow(name="pipeline")
def pipeline_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None) -> dict:
    result = None
    for stage in STAGES.values():
        result = stage(params_path=params_path, overrides=overrides)
    return result
