"""The whole pipeline as one flow: each stage runs as a subflow, in dvc.yaml's order, then the later rounds
``rounds.count`` asks for (rounds/dvc.yaml's stages, in its order)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.base import base_flow
from flows.context import load_layout
from flows.evaluate import evaluate_flow
from flows.prompts import prompts_flow
from flows.rollout import rollout_flow
from flows.score import score_flow
from flows.train import train_flow
from gdro_core.layout import ROUND_STAGES

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
    """Round 1's stages, then rounds 2..``rounds.count``; returns the last round's held-out metrics."""
    rounds = load_layout(params_path, overrides).params.rounds.count
    result = None
    for stage in STAGES.values():
        result = stage(params_path=params_path, overrides=overrides)
    for r in range(2, rounds + 1):
        for name in ROUND_STAGES:
            result = STAGES[name](params_path=params_path, overrides=overrides, round=r)
    return result
