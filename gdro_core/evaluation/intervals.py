"""Confidence intervals of held-out figures: a paired bootstrap over prompts.

A held-out figure is a mean over a few prompts (per tag, on GenEval), and most of its spread is which prompts
the set happens to hold. So the bootstrap resamples prompts, each with all of its images, within each tag where
rows carry one (a tag's size is fixed by the set), and it draws the same prompts for base and trained, so the
interval of their difference is paired: two models that differ on the same hard prompts get a narrow one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd

NOT_MEANS = ("judge_missing",)
"""Summary keys that count images rather than average them: no interval."""
Summary = Callable[[pd.DataFrame], Mapping[str, float]]


def prompt_bootstrap(
    base: pd.DataFrame, trained: pd.DataFrame, prompt_ids: np.ndarray, summarise: Summary, samples: int,
    level: float, seed: int,
) -> dict:
    """``{"base" | "trained" | "delta": {figure: [low, high]}}`` at ``level`` from ``samples`` resamples of prompts,
    with ``level``, ``samples`` and the held-out ``prompts`` per tag (or ``all``).

    ``base`` and ``trained`` are score tables row for row on the same images' prompts; ``prompt_ids[i]`` is the
    prompt of row ``i``. Rows with a ``tag`` column are resampled within their tag. Figures are the numeric keys
    of ``summarise`` on the full tables.
    """
    if len(base) != len(trained) or len(base) != len(prompt_ids):
        raise ValueError(f"base ({len(base)} rows), trained ({len(trained)}) and prompt ids ({len(prompt_ids)}) "
                         "must be the same images row for row")
    prompt_ids = np.asarray(prompt_ids)
    prompts, first = np.unique(prompt_ids, return_index=True)
    rows_of = {p: np.flatnonzero(prompt_ids == p) for p in prompts}
    strata: dict[object, np.ndarray] = {}
    tags = base["tag"].to_numpy()[first] if "tag" in base else np.zeros(len(prompts))
    for t in pd.unique(tags):
        strata[t] = prompts[tags == t]
    keys = [k for k, v in summarise(base).items() if isinstance(v, (int, float)) and k not in NOT_MEANS]
    rng = np.random.default_rng(seed)
    figures: dict[str, list[list[float]]] = {"base": [], "trained": []}
    for _ in range(samples):
        chosen = np.concatenate([rng.choice(members, size=len(members)) for members in strata.values()])
        rows = np.concatenate([rows_of[p] for p in chosen])
        for name, table in (("base", base), ("trained", trained)):
            summary = summarise(table.iloc[rows])
            figures[name].append([summary.get(k, np.nan) for k in keys])
    draws = {name: np.array(values, dtype=float) for name, values in figures.items()}
    draws["delta"] = draws["trained"] - draws["base"]
    tail = (1 - level) / 2 * 100
    out: dict = {"level": level, "samples": samples,
                 "prompts": {str(t) if "tag" in base else "all": len(m) for t, m in strata.items()}}
    for name, values in draws.items():
        low, high = np.nanpercentile(values, [tail, 100 - tail], axis=0)
        out[name] = {k: [float(lo), float(hi)] for k, lo, hi in zip(keys, low, high)}
    return out
