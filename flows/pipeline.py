"""The whole pipeline as one flow: each stage runs as a subflow, in the declared order (gdro_core/stages.py),
then the later rounds ``rounds.count`` asks for."""

from __future__ import annotations

from typing import Any

from prefect import flow, tags

from flows.context import load_layout, run_tags, stage_flow, tag_flow_run
from gdro_core.stages import ROUND_STAGES, STAGE_NAMES, pipeline_stages

STAGES = {name: stage_flow(name) for name in STAGE_NAMES}
"""The default pipeline's flows; ``data.source: import`` runs the import flow in place of rollout and score."""


@flow(name="pipeline")
def pipeline_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None) -> dict:
    """Round 1's stages, then rounds 2..``rounds.count``; returns the last round's held-out metrics."""
    tag_flow_run()  # a deployment's run: tagged with its process, as its stages are, for a later command to check
    params = load_layout(params_path, overrides).params
    result = None
    with tags(*run_tags()):
        for s in pipeline_stages(params):
            result = (STAGES.get(s.name) or stage_flow(s.name))(params_path=params_path, overrides=overrides)
        for r in range(2, params.rounds.count + 1):
            for name in ROUND_STAGES:
                result = STAGES[name](params_path=params_path, overrides=overrides, round=r)
    return result
