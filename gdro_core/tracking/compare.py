"""Registered adapter versions side by side: ranking, the champion alias, a table and a plot.

A version's metrics and params are read from its source run (the ``evaluate`` run that registered it),
which logs metrics named ``trained.reward``, ``trained.corrected``, ``base.reward`` ... and params named
``train.beta`` ...; the version's own ``metric.*`` / ``param.*`` tags fill in when the run is gone.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from gdro_core.params import Params
from gdro_core.tracking.runs import tracking_uri

METRICS = ("trained.reward", "trained.corrected", "base.reward", "base.corrected")


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def version_record(
    version: int, aliases: list[str], run_metrics: dict[str, float], run_params: dict[str, str],
    tags: dict[str, str], params: list[str], metrics: list[str],
) -> dict:
    """One table row: version, aliases, the named metrics and params, data version."""
    row: dict = {"version": int(version), "aliases": ",".join(sorted(aliases))}
    for m in metrics:
        row[m] = _number(run_metrics.get(m, tags.get(f"metric.{m}")))
    for k in params:
        row[k] = run_params.get(k, tags.get(f"param.{k}", ""))
    row["data.rollouts"] = tags.get("data.rollouts", "")[:12]
    row["data.prompts"] = tags.get("data.prompts", "")[:12]
    return row


def ranking_metric(frame: pd.DataFrame, rank_by: list[str]) -> str | None:
    """The first of ``rank_by`` that at least one version has (e.g. ``trained.corrected``, else ``trained.reward``)."""
    for metric in rank_by:
        if metric in frame and frame[metric].notna().any():
            return metric
    return None


def rank_versions(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Versions best first by ``metric`` (higher is better; ties go to the older version); missing values last."""
    return frame.sort_values([metric, "version"], ascending=[False, True], na_position="last", kind="stable")


def pick_champion(frame: pd.DataFrame, rank_by: list[str]) -> tuple[int | None, str | None]:
    """``(version, metric)`` of the best version, or ``(None, None)`` when no version has any ranking metric."""
    metric = ranking_metric(frame, rank_by)
    if metric is None:
        return None, None
    return int(rank_versions(frame, metric).iloc[0]["version"]), metric


def collect_versions(client, name: str, params: list[str], metrics: tuple[str, ...] | list[str] = METRICS,
                     ) -> pd.DataFrame:
    """Every registered version of ``name`` as a table (empty when the model is not registered)."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = client.get_registered_model(name).aliases or {}
    except MlflowException:
        return pd.DataFrame(columns=["version", "aliases", *metrics, *params, "data.rollouts", "data.prompts"])
    by_version: dict[int, list[str]] = {}
    for alias, v in aliases.items():
        by_version.setdefault(int(v), []).append(alias)
    rows = []
    for v in client.search_model_versions(f"name='{name}'"):
        run_metrics, run_params = {}, {}
        if v.run_id:
            try:
                data = client.get_run(v.run_id).data
                run_metrics, run_params = data.metrics, data.params
            except MlflowException:
                pass
        rows.append(version_record(int(v.version), by_version.get(int(v.version), []), run_metrics, run_params,
                                   dict(v.tags or {}), params, metrics))
    columns = ["version", "aliases", *metrics, *params, "data.rollouts", "data.prompts"]
    return pd.DataFrame(rows, columns=columns).sort_values("version", ignore_index=True)


def set_champion(client, name: str, rank_by: list[str], alias: str = "champion") -> tuple[int | None, str | None]:
    """Point ``alias`` at the best version by the first available of ``rank_by``; return ``(version, metric)``."""
    frame = collect_versions(client, name, [], list(dict.fromkeys([*rank_by, *METRICS])))
    version, metric = pick_champion(frame, rank_by)
    if version is not None:
        client.set_registered_model_alias(name, alias, str(version))
    return version, metric


def format_table(frame: pd.DataFrame, metric: str | None) -> str:
    """A plain-text table, best version first by ``metric`` (by version when there is none)."""
    if frame.empty:
        return "(no registered versions)"
    shown = rank_versions(frame, metric) if metric else frame
    return shown.to_string(index=False, float_format=lambda x: f"{x:.4f}", na_rep="-")


def plot_versions(frame: pd.DataFrame, path: Path, alias: str = "champion", title: str = "") -> Path:
    """Grouped bars of trained reward and corrected score per version, base levels dashed, ``alias`` starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = frame.sort_values("version")
    labels = [f"v{v}" + ("*" if alias in str(a).split(",") else "")
              for v, a in zip(frame["version"], frame["aliases"], strict=True)]
    x = range(len(frame))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(frame) + 2), 3.5))
    width = 0.4
    for offset, (metric, color) in zip((-width / 2, width / 2), (("trained.reward", "tab:blue"),
                                                                  ("trained.corrected", "tab:orange")), strict=True):
        if metric in frame:
            ax.bar([i + offset for i in x], frame[metric].fillna(0.0), width, label=metric, color=color)
        base = metric.replace("trained.", "base.")
        if base in frame and frame[base].notna().any():
            ax.axhline(float(frame[base].mean()), color=color, linestyle="--", linewidth=1, label=f"{base} (mean)")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("held-out score")
    ax.set_title(title or f"registered versions (* = {alias})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare_report(params: Params, root: Path, out: Path | None = None) -> tuple[str, Path | None]:
    """`gdro compare`: the table of registered versions (best first) and its plot and CSV beside ``out``."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params.tracking.uri, root))
    name, reg = params.tracking.registered_model, params.registry
    frame = collect_versions(mlflow.MlflowClient(), name, reg.compare_params)
    if frame.empty:
        return (f"no registered versions of '{name}' in {tracking_uri(params.tracking.uri, root)}: "
                "`gdro evaluate` (or `dvc repro`, `gdro sweep`) registers one per trained adapter"), None
    metric = ranking_metric(frame, reg.rank_by)
    if out is None:
        reports = Path(params.paths.reports_dir)
        out = (reports if reports.is_absolute() else root / reports) / "registry_versions.png"
    plot_versions(frame, out, reg.alias, f"{name}: registered versions (* = {reg.alias})")
    frame.to_csv(out.with_suffix(".csv"), index=False)
    header = f"{name}: {len(frame)} versions, best first by {metric or '(no ranking metric yet)'}"
    return f"{header}\n{format_table(frame, metric)}", out
