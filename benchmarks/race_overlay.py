"""Runs of several ``cpu_objectives`` reports side by side: the table, the time ratios and one figure.

``cpu_objectives.py --merge`` joins only reports of the same settings, as it should for one table. Comparing runs
made with other settings (another budget, data sampled or scored another way) on the same base and seeds needs
them side by side instead, each under its own label: this script reads each ``--run LABEL=REPORT:METHOD`` (``{seed}``
in REPORT is replaced by each seed), refuses reports of another base, and prints each run's final and best held-out
reward, second reader, corrected score and time to each target (mean ± sd over seeds), then for every pair the
time the second takes to reach the first's final reward over the time the first takes, per seed and as mean ± sd.
Times are those of each report's ``--clock``; the figure is ``cpu_objectives.py``'s, one colour per run::

    python benchmarks/race_overlay.py --seeds 0 1 2 --out reports/benchmark/overlay.png \\
        --run "GDRO=reports/benchmark/long-s{seed}/cpu_objectives.json:gdro" \\
        --run "GDRO, cheap data=reports/benchmark/cheap-s{seed}/cpu_objectives.json:gdro" \\
        --run "DiffusionNFT=reports/benchmark/long-s{seed}/cpu_objectives.json:diffusion_nft"
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_objectives import CLOCKS, compare, fmt, mean_sd, plot, time_to_reach  # noqa: E402

from gdro_core.data.store import read_json  # noqa: E402


def parse_run(text: str) -> tuple[str, str, str]:
    """``LABEL=REPORT:METHOD`` -> (label, report path pattern, method)."""
    label, sep, rest = text.partition("=")
    path, colon, method = rest.rpartition(":")
    if not (sep and colon and label and path and method):
        raise SystemExit(f"--run {text!r}: expected LABEL=REPORT:METHOD, e.g. "
                         "'GDRO=reports/benchmark/s{seed}/cpu_objectives.json:gdro'")
    return label, path, method


def load_runs(specs: list[str], seeds: list[int]) -> tuple[dict, dict, str]:
    """{seed: {label: run}}, the base every report evaluated, and the clock they share."""
    per_seed: dict[int, dict[str, dict]] = {s: {} for s in seeds}
    base = clock = None
    for label, pattern, method in map(parse_run, specs):
        for seed in seeds:
            path = Path(pattern.format(seed=seed))
            report = read_json(path)
            if base is None:
                base, clock = report["base"], report["settings"]["clock"]
            if report["base"]["reward"] != base["reward"] or report["base"]["corrected"] != base["corrected"]:
                raise SystemExit(f"{path} evaluated another base ({report['base']} against {base}): runs side by "
                                 "side must share the base model, data for the base and held-out prompts")
            if report["settings"]["clock"] != clock:
                raise SystemExit(f"{path} follows the {report['settings']['clock']} clock, not {clock}")
            run = report["per_seed"].get(str(seed), {}).get(method)
            if run is None:
                raise SystemExit(f"{path} holds no {method} run of seed {seed}")
            per_seed[seed][label] = run
    return per_seed, base, clock


def table(per_seed: dict, base: dict, clock: str, deltas: list[float]) -> list[str]:
    key = CLOCKS[clock]
    labels = list(next(iter(per_seed.values())))
    width = max(len(label) for label in labels)
    lines = [f"mean ± sd over seeds {sorted(per_seed)}; times in {clock} seconds; (n/N) = seeds that got there",
             f"{'run':<{width}} {'reward':>13} {'best':>13} {'reward 2':>13} {'corrected':>13} "
             + " ".join(f"{f'to base{d:+.2f}':>14}" for d in deltas)]
    for label in labels:
        runs = [per_seed[s][label] for s in per_seed]
        cells = [mean_sd([r["final"]["reward"] for r in runs]), mean_sd([max(q["reward"] for q in r["curve"]) for r in runs]),
                 mean_sd([r["final"].get("second_reward") for r in runs]), mean_sd([r["final"]["corrected"] for r in runs])]
        reach = [mean_sd([(time_to_reach(r["curve"], base["reward"] + d) or {}).get(key) for r in runs]) for d in deltas]
        lines.append(f"{label:<{width}} " + " ".join(f"{fmt(c):>13}" for c in cells) + " "
                     + " ".join(f"{fmt(c, 0):>14}" for c in reach))
    lines.append(f"{'base':<{width}} {base['reward']:>13.3f}")
    for first, second in itertools.permutations(labels, 2):  # the benchmark's own race: second runs to first's final
        comps = [compare(per_seed[s], base["reward"], deltas, key, ours=second, online=first) for s in per_seed]
        ratios = [c["ratio"] for c in comps]
        shown = ", ".join("never" if r is None else f"{r:.2f}" for r in ratios)
        lines.append(f"to {first}'s final reward, {first} / {second}: {fmt(mean_sd(ratios), 2)} (seeds: {shown})")
        lines += [f"  {reason}" for reason in sorted({c["reason"] for c in comps if c.get("reason")})]
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, metavar="LABEL=REPORT:METHOD",
                    help="a method's runs in a report; {seed} in REPORT is each seed (repeatable, two at least)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--target-deltas", nargs="+", type=float, default=[0.05, 0.10, 0.15, 0.20, 0.25])
    ap.add_argument("--out", type=Path, help="the figure (PNG); none when left out")
    args = ap.parse_args(argv)
    if len(args.run) < 2:
        ap.error("give two --run at least: this script compares runs")
    per_seed, base, clock = load_runs(args.run, args.seeds)
    lines = table(per_seed, base, clock, sorted(args.target_deltas))
    print("\n".join(lines))
    if args.out:
        plot({"per_seed": {str(s): runs for s, runs in per_seed.items()}, "base": base}, args.out)
        print(f"figure: {args.out}")
    return lines


if __name__ == "__main__":
    main()
