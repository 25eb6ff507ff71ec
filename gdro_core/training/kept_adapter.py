"""The end of a training run: choose the kept checkpoint, write its curve and summary, save its adapter."""

from __future__ import annotations

import shutil
from pathlib import Path

from gdro_core.data.store import atomic_write, write_json
from gdro_core.evaluation.curves import hacking_trend, plot_curves
from gdro_core.evaluation.monitor import CheckpointMonitor
from gdro_core.models.base import FlowModel
from gdro_core.models.lora import set_lora_state


def keep_adapter(
    model: FlowModel, monitor: CheckpointMonitor, adapter_dir: Path, reports_dir: Path, hacking_window: int, title: str
) -> dict:
    """Load the monitor's kept weights, write curve/plot/summary and the adapter (atomically); return the summary."""
    step, weights = monitor.kept()
    set_lora_state(model.transformer, weights)
    curve = monitor.curve.sort_values("step")
    summary = {"kept_step": step, "hacking_trend": hacking_trend(curve, hacking_window)}
    atomic_write(reports_dir / "train_curve.csv", lambda f: curve.to_csv(f, index=False))
    plot_curves(curve, reports_dir / "train_curves.png", title)
    tmp = adapter_dir.with_name(f".{adapter_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_adapter(tmp)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    tmp.rename(adapter_dir)
    write_json(reports_dir / "train_summary.json", summary)
    return summary
