"""Registered adapter versions side by side: ranking, the champion alias, a table and a plot.

A version's metrics and params are read from its source run (the ``evaluate`` run that registered it),
which logs metrics named ``trained.reward``, ``trained.corrected``, ``base.reward`` ... and params named
``train.beta`` ...; the version's own ``metric.*`` / ``param.*`` tags fill in when the run is gone.

A version whose registered files are gone (its artifact folder or adapter weights deleted) is marked ``MISSING``
in the ``artifacts`` column, never made champion, and named with how to restore or retire it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from gdro_core.params import Params
from gdro_core.tracking.uri import tracking_uri

METRICS = ("trained.reward", "trained.corrected", "base.reward", "base.corrected")


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def missing_artifacts(client, name: str, version: int | str) -> str:
    """What is gone of a registered version's files ('' when its ``MLmodel`` and adapter weights are there)."""
    import yaml
    from mlflow.artifacts import list_artifacts, load_text
    from mlflow.exceptions import MlflowException

    from gdro_core.models.lora import WEIGHTS

    try:
        uri = client.get_model_version_download_uri(name, str(version)).rstrip("/")
        if not any(f.path.rsplit("/", 1)[-1] == "MLmodel" for f in list_artifacts(artifact_uri=uri)):
            return f"no model files at {uri}"
        spec = yaml.safe_load(load_text(f"{uri}/MLmodel")) or {}
        adapter = spec.get("flavors", {}).get("python_function", {}).get("artifacts", {}).get("adapter", {})
        if adapter.get("path"):  # the adapter folder inside the model (named after the trained adapter's folder)
            where = f"{uri}/{adapter['path']}"
            if not any(f.path.rsplit("/", 1)[-1] == WEIGHTS for f in list_artifacts(artifact_uri=where)):
                return f"no adapter weights ({WEIGHTS}) at {where}"
    except (MlflowException, OSError, yaml.YAMLError, AttributeError) as err:
        return f"its files cannot be read ({err})"
    return ""


def broken_version_advice(name: str, version: int, problem: str, uri: str) -> str:
    """One line: which version is broken, how to re-register it, and how to retire it."""
    return (f"version {version} of '{name}' is broken: {problem}. Restore it by registering its adapter again "
            f"(`gdro evaluate`, or `dvc repro --force evaluate`), or retire it: python -c \"import mlflow; "
            f"mlflow.set_tracking_uri('{uri}'); mlflow.MlflowClient().delete_model_version('{name}', '{version}')\"")


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
    """``(version, metric)`` of the best version whose files are there, or ``(None, None)`` when no such version
    has any ranking metric."""
    if "artifacts" in frame:
        frame = frame[frame["artifacts"] != MISSING]
    metric = ranking_metric(frame, rank_by)
    if metric is None:
        return None, None
    return int(rank_versions(frame, metric).iloc[0]["version"]), metric


MISSING = "MISSING"


def collect_versions(client, name: str, params: list[str], metrics: tuple[str, ...] | list[str] = METRICS,
                     ) -> pd.DataFrame:
    """Every registered version of ``name`` as a table (empty when the model is not registered); its ``artifacts``
    column is ``ok``, or ``MISSING`` (with the reason in ``frame.attrs["missing"][version]``)."""
    from mlflow.exceptions import MlflowException

    columns = ["version", "aliases", *metrics, *params, "data.rollouts", "data.prompts", "artifacts"]
    try:
        aliases = client.get_registered_model(name).aliases or {}
    except MlflowException:
        return pd.DataFrame(columns=columns)
    by_version: dict[int, list[str]] = {}
    for alias, v in aliases.items():
        by_version.setdefault(int(v), []).append(alias)
    rows, missing = [], {}
    for v in client.search_model_versions(f"name='{name}'"):
        run_metrics, run_params = {}, {}
        if v.run_id:
            try:
                data = client.get_run(v.run_id).data
                run_metrics, run_params = data.metrics, data.params
            except MlflowException:
                pass
        row = version_record(int(v.version), by_version.get(int(v.version), []), run_metrics, run_params,
                             dict(v.tags or {}), params, metrics)
        problem = missing_artifacts(client, name, v.version)
        row["artifacts"] = MISSING if problem else "ok"
        if problem:
            missing[int(v.version)] = problem
        rows.append(row)
    frame = pd.DataFrame(rows, columns=columns).sort_values("version", ignore_index=True)
    frame.attrs["missing"] = missing
    return frame


def set_champion(client, name: str, rank_by: list[str], alias: str = "champion") -> tuple[int | None, str | None]:
    """Point ``alias`` at the best version, by the first available of ``rank_by``, whose files are there; return
    ``(version, metric)``. With no such version, an alias left on a broken version is removed."""
    frame = collect_versions(client, name, [], list(dict.fromkeys([*rank_by, *METRICS])))
    version, metric = pick_champion(frame, rank_by)
    if version is not None:
        client.set_registered_model_alias(name, alias, str(version))
    elif not frame.empty and any(alias in str(a).split(",") for a in frame["aliases"]):
        client.delete_registered_model_alias(name, alias)
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


def unregistered_outputs(params: Params, root: Path, open_store: bool = True) -> str:
    """One line when evaluate's outputs (metrics.json) exist but the tracking store has no registered version of
    ``tracking.registered_model`` (``mlflow.db`` deleted, or ``tracking.uri`` changed): `dvc repro` then reuses every
    output and registers nothing. '' otherwise. ``open_store=False`` only looks for a missing local store file (a
    remote server is not asked)."""
    from gdro_core.layout import Layout

    name = params.tracking.registered_model
    metrics = Layout(root=Path(root), params=params).metrics
    if not name or not metrics.is_file():
        return ""
    uri = tracking_uri(params.tracking.uri, root)
    fix = ("`dvc repro` reuses the outputs and registers nothing; register the trained adapter again with "
           "`gdro evaluate` (or `dvc repro --force evaluate`)")
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return (f"the tracking store {uri} is gone while {metrics} exists, so its runs and registered versions are "
                f"lost: {fix}")
    if not open_store and not uri.startswith("sqlite:///"):
        return ""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.set_tracking_uri(uri)
        versions = mlflow.MlflowClient().search_model_versions(f"name='{name}'", max_results=1)
    except (MlflowException, OSError):
        return ""
    if versions:
        return ""
    return (f"the tracking store {uri} has no registered version of '{name}' while {metrics} exists (mlflow.db "
            f"deleted or replaced, or tracking.uri changed): {fix}")


def compare_report(params: Params, root: Path, out: Path | None = None) -> tuple[str, Path | None, list[str]]:
    """`gdro compare`: the table of registered versions (best first), its plot and CSV beside ``out``, and one line
    per broken version (files gone) saying how to restore or retire it. A broken champion's alias is moved to the
    best intact version (removed when there is none), and a line says so."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params.tracking.uri, root))
    name, reg = params.tracking.registered_model, params.registry
    frame = collect_versions(mlflow.MlflowClient(), name, reg.compare_params)
    if frame.empty:
        lost = unregistered_outputs(params, root)
        if lost:
            return f"no registered versions of '{name}'", None, [lost]
        return (f"no registered versions of '{name}' in {tracking_uri(params.tracking.uri, root)}: "
                "`gdro evaluate` (or `dvc repro`, `gdro sweep`) registers one per trained adapter"), None, []
    notes = []
    if frame.attrs.get("missing"):
        uri = tracking_uri(params.tracking.uri, root)
        notes = [broken_version_advice(name, v, problem, uri) for v, problem in sorted(frame.attrs["missing"].items())]
        champion = [int(v) for v, a in zip(frame["version"], frame["aliases"], strict=True)
                    if reg.alias in str(a).split(",")]
        if champion and int(champion[0]) in frame.attrs["missing"]:  # never keep a broken champion
            best, _ = set_champion(mlflow.MlflowClient(), name, reg.rank_by, reg.alias)
            notes.append(f"{reg.alias} was the broken version {champion[0]}: "
                         + (f"moved to version {best}" if best is not None else "removed (no intact version left)"))
            frame = collect_versions(mlflow.MlflowClient(), name, reg.compare_params)
    metric = ranking_metric(frame, reg.rank_by)
    if out is None:
        reports = Path(params.paths.reports_dir)
        out = (reports if reports.is_absolute() else root / reports) / "registry_versions.png"
    plot_versions(frame, out, reg.alias, f"{name}: registered versions (* = {reg.alias})")
    frame.to_csv(out.with_suffix(".csv"), index=False)
    header = f"{name}: {len(frame)} versions, best first by {metric or '(no ranking metric yet)'}"
    return f"{header}\n{format_table(frame, metric)}", out, notes
