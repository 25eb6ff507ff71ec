"""Stage `prompts`: the task's prompt sets (train, held-out test, validation), generated or read from files."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.context import load_layout
from gdro_core.tasks.registry import make_task
from gdro_core.tracking.runs import stage_run


@flow(name="prompts")
def prompts_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None) -> dict[str, int]:
    lay = load_layout(params_path, overrides)
    p = lay.params
    with stage_run(p, lay.root, "prompts"):
        task = make_task(p)
        sets = task.make_prompt_sets(lay.root)  # generated, or read from prompts.source / geneval.metadata_dir
        for split, items in sets.items():
            task.write_prompts(lay.prompts(split), items)
        counts = {split: len(items) for split, items in sets.items()}
        get_run_logger().info("wrote prompt sets %s to %s", counts, lay.prompts_dir)
        return counts
