"""GenEval's summary table from an evaluate stage's metrics.json: per-tag accuracy of base and trained model,
the overall GenEval score, the partial credit, the corrected score and the ceiling.

``python -m gdro_core.tasks.geneval.report reports-geneval/metrics.json``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gdro_core.tasks.geneval.prompts import TAGS

ROWS = [*(f"tag.{t}" for t in TAGS), "geneval", "compositional", "geneval_clean", "clean_share", "score", "strict",
        "u_hat", "corrected"]


def format_report(metrics: dict[str, dict[str, float]]) -> str:
    """One row per tag and summary metric; columns base, trained, ceiling, delta and, where metrics.json has
    intervals (``ci``), the delta's interval over resampled held-out prompts."""
    cols = [c for c in ("base", "trained", "ceiling") if c in metrics]
    intervals = metrics.get("ci", {})
    ci, level = intervals.get("delta", {}), intervals.get("level")
    ci_head = f"{round(100 * level)} % interval" if level else "interval"
    lines = [f"{'':<20}" + "".join(f"{c:>10}" for c in cols) + f"{'delta':>10}" + (f"  {ci_head}" if ci else "")]
    for row in ROWS:
        if not any(row in metrics[c] for c in cols):
            continue
        cells = "".join(f"{metrics[c][row]:>10.3f}" if row in metrics[c] else f"{'':>10}" for c in cols)
        delta = metrics["trained"].get(row, float("nan")) - metrics["base"].get(row, float("nan"))
        interval = f"  [{ci[row][0]:+.3f}, {ci[row][1]:+.3f}]" if row in ci else ""
        lines.append(f"{row.removeprefix('tag.'):<20}{cells}{delta:>+10.3f}{interval}")
    held = intervals.get("prompts", {})
    if held:
        lines.append("held-out prompts per tag: " + ", ".join(f"{t} {n}" for t, n in held.items()))
    if "base_train" in metrics:  # evaluate.train_prompts: the models on their own training prompts, fresh seeds
        lines.append("on training prompts (fresh seeds):")
        for row in ("geneval", "score"):
            base, trained = metrics["base_train"][row], metrics["trained_train"][row]
            lines.append(f"{row:<20}{base:>10.3f}{trained:>10.3f}{'':>10}{trained - base:>+10.3f}")
    judge = metrics.get("judge", {})
    if "corrected_score_judge" in judge:  # the judge behind u_hat and corrected
        note = judge.get("corrected_score_note")
        lines.append(f"corrected score judge: {judge['corrected_score_judge']}" + (f" ({note})" if note else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    path = Path(args[0] if args else "reports-geneval/metrics.json")
    if not path.is_file():
        print(f"no metrics at {path}: run `make demo-geneval` (or the evaluate stage) first", file=sys.stderr)
        return 1
    print(format_report(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
