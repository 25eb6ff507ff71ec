"""Held-out reward and corrected score against wall-clock seconds, for every objective, in one process.

From the same base model (``models/base``), the same offline data (``data/rollouts``, ``data/rewards.parquet``)
and the same held-out prompts, each method trains under one budget (``--budget-seconds`` of its own clock,
and/or ``--budget-steps`` optimiser steps, iterations for Flow-GRPO):

- ``gdro`` (params.yaml's train section), ``gdro_top1`` (``positions: 1``), ``gdro_rank`` (``tau: 0``),
  ``dpo`` and ``sft_best``: the offline objectives of :mod:`gdro_core.training` on the cached groups;
- ``flow_grpo``: the online baseline of :mod:`gdro_core.online_grpo`, sampling and scoring as it trains.

**Clocks.** A method's clock is wall time spent in its training loop; the benchmark's own work (evaluations
and the EMA copy it evaluates) is left out. The offline methods also pay for the data they train on: their
clock starts at the cost of the ``rollout`` and ``score`` stages. That cost is measured here, not read from
the stage logs: the same rollout (``gdro_core.rollout.generate_rollouts``, same sampler, pool size and
prompt batching, PNGs and shards written) and scoring (``gdro_core.scoring.score_rollouts``, same reader) are
re-run on ``--rollout-prompts`` training prompts and scaled linearly to all of them. Each method's time is
split into generation (offline rollout / online SDE sampling and decoding), scoring (OCR) and training.

**Evaluation.** Every ``--eval-every`` seconds of a method's clock, and when its budget is spent, the EMA of
its adapter (the schedule of ``train.ema_rate``/``ema_max_decay``, started from the first step's weights)
is evaluated exactly as ``gdro train`` evaluates checkpoints (:class:`gdro_core.monitor.CheckpointMonitor`:
ODE sampler, ``evaluate.seed``, OCR reward, judge, corrected score) on the first ``--eval-prompts`` held-out
prompts. Each curve starts with the base model's scores at the method's starting clock.

Writes ``reports/benchmark/cpu_objectives.json`` and ``cpu_objectives.png`` (reward and corrected score
against seconds, one line per method) and prints each method's final reward and corrected score, the time
GDRO took to reach Flow-GRPO's final reward and the ratio of Flow-GRPO's time to it. Run after ``make demo``::

    python benchmarks/cpu_objectives.py                                   # all methods, 600 s each
    python benchmarks/cpu_objectives.py --budget-seconds 120 --methods gdro flow_grpo --eval-every 20
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from gdro_core.models import load_flow_model

from gdro_core.models.base import FlowModel
from gdro_core.evaluation.judge import Judge, make_judge
from gdro_core.layout import Layout
from gdro_core.models.lora import lora_state
from gdro_core.evaluation.monitor import CheckpointMonitor
from gdro_core.tasks.ocr import Reader, make_reader
from gdro_core.tasks.ocr_task import OcrTask
from gdro_core.training.online_grpo import RewardFn, encode_prompts, reader_reward, train_online
from gdro_core.params import Params, Train, load_params
from gdro_core.data.prompts import OcrPrompt, read_prompts
from gdro_core.data.rollout import MANIFEST, Rollouts, generate_rollouts, load_rollouts
from gdro_core.data.scoring import reward_matrix, score_rollouts
from gdro_core.data.store import write_json
from gdro_core.training.loop import LoraEma, ema_decay, train

METHODS: dict[str, dict] = {
    "gdro": {},
    "gdro_top1": {"positions": 1},
    "gdro_rank": {"tau": 0.0},
    "dpo": {"objective": "dpo"},
    "sft_best": {"objective": "sft_best"},
    "flow_grpo": {"objective": "flow_grpo"},
}
ONLINE = {"flow_grpo"}
NEVER = 10**9  # a step count no run reaches: the budget stops every run, and nothing is checkpointed
OUT_NAME = "cpu_objectives"
SCORES = ("reward", "corrected")


class BudgetReached(Exception):
    """Raised from the training loop's logger once a method has spent its budget."""


@dataclass
class Shared:
    """Everything the methods share: params, layout, data, prompts, reader, judge, base scores, offline cost."""

    lay: Layout
    data: Rollouts
    rewards: torch.Tensor
    train_prompts: list[OcrPrompt]
    eval_prompts: list[OcrPrompt]
    reader: Reader
    judge: Judge
    reward_fn: RewardFn
    base: dict[str, float]
    offline: dict[str, float]

    @property
    def params(self) -> Params:
        return self.lay.params


def missing_outputs(lay: Layout) -> list[Path]:
    """The DVC outputs the benchmark reads that are not there."""
    p = lay.params
    base = lay.base_dir / ("model_index.json" if p.model.source == "builtin" else "")
    need = [lay.prompts("train"), lay.prompts("test"), base, lay.rollout_dir / MANIFEST, lay.rewards]
    return [path for path in need if not path.exists()]


def load_model(lay: Layout) -> FlowModel:
    p = lay.params
    return load_flow_model(p.model.source, lay.base_dir, p.world, p.model.device, p.model.dtype)


def make_monitor(model: FlowModel, shared: Shared, workdir: Path) -> CheckpointMonitor:
    """The evaluation ``gdro train`` runs at checkpoints, on the benchmark's held-out prompts."""
    p = shared.params
    return CheckpointMonitor(
        model, shared.eval_prompts, OcrTask(p, reader=shared.reader), shared.judge, judge_task=p.judge.task,
        seed=p.evaluate.seed, steps=p.sampler.steps, guidance=p.sampler.guidance, batch_size=p.sampler.batch_size,
        keep="last", workdir=workdir, log=lambda step, metrics: None,
    )


def measure_offline(model: FlowModel, lay: Layout, reader: Reader, prompts: list[OcrPrompt], n_prompts: int,
                    total_prompts: int) -> dict[str, float]:
    """Seconds the rollout and score stages take for ``total_prompts``, from a run on ``n_prompts``, scaled."""
    p = lay.params
    m = max(1, min(n_prompts, len(prompts)))
    per_batch = max(1, p.sampler.batch_size // p.rollout.images_per_prompt)  # as the rollout stage batches
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        manifest = generate_rollouts(
            model, prompts[:m], p.rollout.images_per_prompt, p.rollout.seed, p.sampler.steps, p.sampler.guidance,
            per_batch, Path(tmp), "benchmark",
        )
        t1 = time.perf_counter()
        score_rollouts(manifest["rows"], Path(tmp), reader, p.reward.substring_full_credit, p.reward.batch_size)
        t2 = time.perf_counter()
    scale = total_prompts / m
    return {
        "generation_s": (t1 - t0) * scale, "scoring_s": (t2 - t1) * scale, "measured_prompts": m,
        "total_prompts": total_prompts, "images_per_prompt": p.rollout.images_per_prompt,
        "measured_generation_s": t1 - t0, "measured_scoring_s": t2 - t1,
    }


class Tracker:
    """The training loop's logger: keeps the method's clock, its EMA and its curve; stops it at the budget."""

    def __init__(self, model: FlowModel, monitor: CheckpointMonitor, cfg: Train, base: dict[str, float],
                 offset: float, budget_seconds: float, budget_steps: int, eval_every: float):
        self.model, self.monitor, self.cfg = model, monitor, cfg
        self.offset, self.budget_seconds, self.budget_steps = offset, budget_seconds, budget_steps
        self.eval_every = eval_every
        self.elapsed = self.generation = self.scoring = 0.0
        self.steps = 0
        self.ema: LoraEma | None = None
        self.curve = [{"seconds": offset, "step": 0, **base}]
        self.next_eval = offset + eval_every if eval_every > 0 else float("inf")
        self.resumed = time.perf_counter()

    def start(self) -> None:
        self.resumed = time.perf_counter()

    def pause(self) -> None:
        self.elapsed += time.perf_counter() - self.resumed

    @property
    def clock(self) -> float:
        return self.offset + self.elapsed

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.pause()
        self.steps = step
        self.generation += metrics.get("time/generation_s", 0.0)
        self.scoring += metrics.get("time/scoring_s", 0.0)
        live = lora_state(self.model.transformer)
        if self.ema is None:
            self.ema = LoraEma(live)
        else:
            self.ema.update(live, ema_decay(step, self.cfg.ema_rate, self.cfg.ema_max_decay))
        done = self.clock >= self.budget_seconds or (self.budget_steps > 0 and step >= self.budget_steps)
        if done or self.clock >= self.next_eval:
            self.monitor(step, self.ema.shadow)
            row = self.monitor.curve[self.monitor.curve["step"] == step].iloc[-1]
            self.curve.append({"seconds": self.clock, "step": step, **{k: float(row[k]) for k in SCORES}})
            while self.next_eval <= self.clock:
                self.next_eval += self.eval_every
        if done:
            raise BudgetReached
        self.start()


def run_method(name: str, shared: Shared, args: argparse.Namespace, workdir: Path) -> dict:
    """Train one method from the base under the budget; its curve, step count and time split."""
    p = shared.params
    cfg = p.train.model_copy(update={**METHODS[name], "steps": NEVER, "checkpoint_every": NEVER, "log_every": 1})
    torch.manual_seed(p.seed)  # the same LoRA initialisation for every method
    model = load_model(shared.lay)
    online = name in ONLINE
    offline_s = 0.0 if online else shared.offline["generation_s"] + shared.offline["scoring_s"]
    tracker = Tracker(model, make_monitor(model, shared, workdir / name / "monitor"), cfg, shared.base, offline_s,
                      args.budget_seconds, args.budget_steps, args.eval_every)
    tracker.start()
    try:
        if online:
            t0 = time.perf_counter()
            cond, null = encode_prompts(model, shared.train_prompts, p.sampler.batch_size)
            tracker.generation += time.perf_counter() - t0
            train_online(model, shared.train_prompts, cond, null, shared.reward_fn, cfg, workdir / name / "ckpt",
                         tracker, guidance=p.sampler.guidance)
        else:
            train(model, shared.data, shared.rewards, cfg, workdir / name / "ckpt", tracker)
    except BudgetReached:
        pass
    if online:
        generation, scoring = tracker.generation, tracker.scoring
        training = tracker.elapsed - generation - scoring
    else:
        generation, scoring, training = shared.offline["generation_s"], shared.offline["scoring_s"], tracker.elapsed
    final = tracker.curve[-1]
    return {
        "train": {k: v for k, v in cfg.model_dump().items() if k in METHODS[name] or k == "objective"},
        "online": online,
        "steps": tracker.steps,
        "time": {"generation_s": generation, "scoring_s": scoring, "training_s": training,
                 "total_s": generation + scoring + training},
        "final": {k: final[k] for k in SCORES},
        "curve": tracker.curve,
    }


def time_to_reach(curve: list[dict], target: float) -> float | None:
    """Seconds of the first evaluation whose reward is at least ``target``."""
    for point in sorted(curve, key=lambda q: q["seconds"]):
        if point["reward"] >= target - 1e-9:
            return point["seconds"]
    return None


def compare(methods: dict[str, dict]) -> dict | None:
    """GDRO's time to Flow-GRPO's final reward, and Flow-GRPO's time to it (its whole run) over GDRO's."""
    if "gdro" not in methods or "flow_grpo" not in methods:
        return None
    target = methods["flow_grpo"]["final"]["reward"]
    grpo_s = methods["flow_grpo"]["curve"][-1]["seconds"]
    gdro_s = time_to_reach(methods["gdro"]["curve"], target)
    return {"target_reward": target, "gdro_seconds": gdro_s, "flow_grpo_seconds": grpo_s,
            "ratio": grpo_s / gdro_s if gdro_s else None}


def plot(report: dict, path: Path) -> Path:
    """Reward and corrected score against seconds, one line per method, the base dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, SCORES):
        for name, result in report["methods"].items():
            curve = pd.DataFrame(result["curve"])
            ax.plot(curve["seconds"], curve[key], marker="o", markersize=3, label=name)
        ax.axhline(report["base"][key], linestyle="--", color="grey", label="base")
        ax.set_xlabel("wall-clock seconds (offline methods start at their rollout + scoring cost)")
        ax.set_title(f"held-out {key}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary_lines(report: dict) -> list[str]:
    lines = [f"{'method':<10} {'steps':>7} {'reward':>7} {'corrected':>9} "
             f"{'gen s':>8} {'score s':>8} {'train s':>8} {'total s':>8}"]
    for name, r in report["methods"].items():
        t = r["time"]
        lines.append(
            f"{name:<10} {r['steps']:>7} {r['final']['reward']:>7.3f} {r['final']['corrected']:>9.3f} "
            f"{t['generation_s']:>8.1f} {t['scoring_s']:>8.1f} {t['training_s']:>8.1f} {t['total_s']:>8.1f}"
        )
    lines.append(f"{'base':<10} {0:>7} {report['base']['reward']:>7.3f} {report['base']['corrected']:>9.3f}")
    c = report["comparison"]
    if c is None:
        lines.append("ratio flow_grpo / gdro: n/a (run both gdro and flow_grpo to compare them)")
    elif c["gdro_seconds"] is None:
        lines.append(f"time to Flow-GRPO's final reward {c['target_reward']:.3f}: gdro not reached within its budget, "
                     f"flow_grpo {c['flow_grpo_seconds']:.1f} s")
        lines.append("ratio flow_grpo / gdro: n/a (gdro did not reach it)")
    else:
        lines.append(f"time to Flow-GRPO's final reward {c['target_reward']:.3f}: gdro {c['gdro_seconds']:.1f} s, "
                     f"flow_grpo {c['flow_grpo_seconds']:.1f} s")
        lines.append(f"ratio flow_grpo / gdro: {c['ratio']:.2f}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("."), help="project root (holds params.yaml and the DVC outputs)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file, relative to --root")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--budget-seconds", type=float, default=360.0,
                    help="each method's clock budget; an offline method's clock starts at the rollout + scoring cost "
                         "(about 220 s here), so it must exceed that "
                         "(the default keeps all six methods under 30 min on 2 CPU cores)")
    ap.add_argument("--budget-steps", type=int, default=0, help="also stop after this many steps (0 = no step budget)")
    ap.add_argument("--eval-every", type=float, default=60.0, help="seconds of a method's clock between evaluations")
    ap.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts per evaluation")
    ap.add_argument("--rollout-prompts", type=int, default=8, help="training prompts the offline cost is measured on")
    ap.add_argument("--out-dir", type=Path, help="default: <reports_dir>/benchmark")
    args = ap.parse_args(argv)
    if args.budget_seconds <= 0:
        ap.error("--budget-seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    root = args.root.resolve()
    params = load_params(args.params if args.params.is_absolute() else root / args.params)
    lay = Layout(root=root, params=params)
    missing = missing_outputs(lay)
    if missing:
        raise SystemExit(
            "the benchmark needs the pipeline's outputs (base model, rollouts, reward table); missing: "
            + ", ".join(str(m) for m in missing) + ". Run `make demo` (or `dvc repro score`) first."
        )
    p = params
    out_dir = args.out_dir or lay.reports_dir / "benchmark"
    data = load_rollouts(lay.rollout_dir)
    rewards = reward_matrix(pd.read_parquet(lay.rewards), *data.latents.shape[:2])
    reader = make_reader(p.reward.backend, p.reward.upscale, p.reward.pad,
                         p.world.alphabet if p.reward.restrict_to_alphabet else None)  # as the score stage reads
    train_prompts = read_prompts(lay.prompts("train"))
    eval_prompts = read_prompts(lay.prompts("test"))[: args.eval_prompts]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        base_model = load_model(lay)
        shared = Shared(lay, data, rewards, train_prompts, eval_prompts, reader, make_judge(p.world, p.judge),
                       reader_reward(reader, p.reward.substring_full_credit, p.reward.batch_size), {}, {})
        base_monitor = make_monitor(base_model, shared, workdir / "base")
        base_monitor.evaluate_base()  # also warms up the sampler and the reader before anything is timed
        shared.base = {k: float(base_monitor.curve[k].iloc[0]) for k in SCORES}
        print(f"base: reward {shared.base['reward']:.3f}, corrected {shared.base['corrected']:.3f}", flush=True)
        shared.offline = measure_offline(base_model, lay, reader, train_prompts, args.rollout_prompts,
                                         data.latents.shape[0])
        del base_model
        print(f"offline rollout + score ({shared.offline['total_prompts']} prompts x "
              f"{shared.offline['images_per_prompt']} images, measured on {shared.offline['measured_prompts']}): "
              f"{shared.offline['generation_s']:.1f} s + {shared.offline['scoring_s']:.1f} s", flush=True)
        methods = {}
        for name in args.methods:
            methods[name] = run_method(name, shared, args, workdir)
            r = methods[name]
            print(f"{name}: {r['steps']} steps, reward {r['final']['reward']:.3f}, "
                  f"corrected {r['final']['corrected']:.3f}, {r['time']['total_s']:.1f} s", flush=True)
    report = {
        "settings": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "device": p.model.device,
            "torch_threads": torch.get_num_threads(),
        },
        "offline": {**shared.offline, "method": "rollout + score re-run on measured_prompts, scaled linearly"},
        "base": shared.base,
        "methods": methods,
        "comparison": compare(methods),
    }
    write_json(out_dir / f"{OUT_NAME}.json", report)
    plot(report, out_dir / f"{OUT_NAME}.png")
    print("\n".join(summary_lines(report)))
    print(f"written to {out_dir / OUT_NAME}.json and .png")
    return report


if __name__ == "__main__":
    main()
