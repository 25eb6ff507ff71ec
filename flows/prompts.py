"""Stage `prompts`: the OCR prompt sets (train, held-out test, validation), generated or read from prompt_files/."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.context import load_layout
from gdro_core.data.prompts import load_prompt_source, make_prompt_sets, validate_prompt_sets, write_prompts
from gdro_core.tracking.runs import stage_run


@flow(name="prompts")
def prompts_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None) -> dict[str, int]:
    lay = load_layout(params_path, overrides)
    p = lay.params
    with stage_run(p, lay.root, "prompts", ("world", "prompts")):
        if p.prompts.source:
            sets = load_prompt_source(lay.root / p.prompts.source, p.prompts.n_val)
        else:
            sets = make_prompt_sets(
                p.world.alphabet, p.world.min_len, p.world.max_len, p.prompts.templates,
                p.prompts.n_train, p.prompts.n_test, p.prompts.seed, p.prompts.n_val,
            )
        validate_prompt_sets(sets, p, p.prompts.source or "generated prompt sets")
        for split, items in sets.items():
            write_prompts(lay.prompts(split), items)
        counts = {split: len(items) for split, items in sets.items()}
        get_run_logger().info("wrote prompt sets %s to %s", counts, lay.prompts_dir)
        return counts
