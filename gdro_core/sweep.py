"""Sweep configs: a grid or list over train / evaluate / judge params, each trained on the same cached data.

Pure functions: expanding the grid, naming configs, the per-config overrides (own adapter and reports
directories), checking each config against the params schema, ranking results and the equivalent
``dvc exp run`` commands.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

import pandas as pd

from gdro_core.params import Params, ParamsError, Sweep, parse_params


class SweepError(RuntimeError):
    """A sweep that cannot run; the message says what to do."""


@dataclass(frozen=True)
class SweepConfig:
    label: str                 # file-name and git-ref safe, unique within the sweep
    values: dict[str, Any]     # the swept params, dotted keys


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, first key varying slowest (``{}`` alone for an empty grid)."""
    if not grid:
        return []
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (int, str)):
        return str(value)
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:6]


def config_label(values: dict[str, Any]) -> str:
    """``beta6-tau0.05``: leaf names (full dotted keys where leaves repeat) and values, safe as a path and git ref."""
    leaves = [k.rsplit(".", 1)[-1] for k in values]
    names = [leaf if leaves.count(leaf) == 1 else key.replace(".", "_")
             for key, leaf in zip(values, leaves, strict=True)]
    label = "-".join(f"{n}{_fmt(v)}" for n, v in zip(names, values.values(), strict=True)) or "base"
    label = re.sub(r"[^A-Za-z0-9_.-]", "_", label).strip(".")
    if len(label) > 80:
        label = "cfg-" + hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return label


def sweep_configs(sweep: Sweep) -> list[SweepConfig]:
    """The grid's configs then the explicit ones, duplicates dropped, labels made unique."""
    out: list[SweepConfig] = []
    seen_values: set[str] = set()
    seen_labels: set[str] = set()
    for values in [*expand_grid(sweep.grid), *sweep.configs]:
        key = json.dumps(values, sort_keys=True, default=str)
        if key in seen_values:
            continue
        seen_values.add(key)
        label, n = config_label(values), 2
        while label in seen_labels:
            label, n = f"{config_label(values)}-{n}", n + 1
        seen_labels.add(label)
        out.append(SweepConfig(label, dict(values)))
    return out


def resolve_sweep(
    sweep: Sweep, grid: dict[str, list[Any]] | None = None, configs: list[dict[str, Any]] | None = None,
    name: str | None = None, max_workers: int | None = None,
) -> Sweep:
    """The params' sweep section with any of its fields replaced (from the CLI or a deployment run), re-validated."""
    data = sweep.model_dump()
    for key, value in (("grid", grid), ("configs", configs), ("name", name), ("max_workers", max_workers)):
        if value is not None:
            data[key] = value
    if grid is not None and configs is None:
        data["configs"] = []
    try:
        return parse_params({"sweep": data}, "sweep arguments").sweep
    except ParamsError as err:
        raise SweepError(str(err)) from None


def config_overrides(params: Params, sweep_name: str, config: SweepConfig, base: dict[str, Any] | None = None) -> dict:
    """Overrides for one config's train and evaluate flows: its values plus its own adapter and reports directories."""
    return {
        **(base or {}),
        **config.values,
        "paths.adapter_dir": f"{params.paths.models_dir}/sweeps/{sweep_name}/{config.label}",
        "paths.reports_dir": f"{params.paths.reports_dir}/sweeps/{sweep_name}/{config.label}",
    }


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = data.get(p)
        if not isinstance(node, dict):
            node = data[p] = {}
        data = node
    data[leaf] = value


def check_configs(params: Params, configs: list[SweepConfig]) -> None:
    """Validate every config against the params schema (and its images against the model family) before anything
    runs; the error names config and key."""
    from gdro_core.models import ModelError, check_image_size

    if not configs:
        raise SweepError("the sweep has no configs: set sweep.grid (e.g. train.beta: [6, 12]) or sweep.configs")
    for config in configs:
        data = params.model_dump()
        data["sweep"] = {}
        for key, value in config.values.items():
            _set_dotted(data, key, value)
        try:
            check_image_size(parse_params(data, f"sweep config '{config.label}'"))
        except ParamsError as err:
            raise SweepError(str(err)) from None
        except ModelError as err:
            raise SweepError(f"sweep config '{config.label}': {err}") from None


def results_frame(results: list[dict], rank_by: list[str]) -> tuple[pd.DataFrame, str | None]:
    """One row per config (label, swept values, metrics, version, run), best first by the first available metric."""
    frame = pd.json_normalize(results, sep=".") if results else pd.DataFrame(columns=["label"])
    frame.columns = [c.removeprefix("values.").removeprefix("metrics.") for c in frame.columns]
    metric = next((m for m in rank_by if m in frame and frame[m].notna().any()), None)
    if metric is not None:
        frame = frame.sort_values(metric, ascending=False, na_position="last", kind="stable", ignore_index=True)
    return frame, metric


def dvc_exp_commands(
    configs: list[SweepConfig], sweep_name: str, defaults: dict[str, Any], in_file: set[str] | None = None,
) -> list[list[str]]:
    """``dvc exp run -n <sweep>-<label> -S key=value ...`` per config.

    Every key swept by any config is set in every command (``defaults`` fill the ones a config leaves out),
    because a workspace experiment starts from the previous one's params.yaml. Keys not written in
    params.yaml (``in_file``; None = all are) get Hydra's ``++`` so DVC adds them.
    """
    keys = list(dict.fromkeys(k for c in configs for k in c.values))
    commands = []
    for c in configs:
        values = {k: c.values.get(k, defaults.get(k)) for k in keys}
        sets = [a for k, v in values.items()
                for a in ("-S", f"{'' if in_file is None or k in in_file else '++'}{k}={json.dumps(v)}")]
        commands.append(["dvc", "exp", "run", "-n", f"{sweep_name}-{c.label}", *sets])
    return commands


def dotted_keys(data: dict, prefix: str = "") -> set[str]:
    """Every dotted key path of a nested mapping (``{'train': {'beta': 1}}`` -> ``{'train', 'train.beta'}``)."""
    out: set[str] = set()
    for k, v in data.items():
        key = f"{prefix}{k}"
        out.add(key)
        if isinstance(v, dict):
            out |= dotted_keys(v, f"{key}.")
    return out


def dotted_defaults(params: Params, keys: list[str]) -> dict[str, Any]:
    """The params' current values of dotted keys."""
    out = {}
    for key in keys:
        node: Any = params.model_dump()
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out
