"""Held-out reward, corrected score and time to reward targets, for every objective, over several seeds.

From the same base model (``models/base``), the same offline data (``data/rollouts``, ``data/rewards.parquet``)
and the same held-out prompts, each method trains under the same budget *after its own data cost*:

- ``gdro`` (params.yaml's train section), ``gdro_top1`` (``positions: 1``), ``gdro_rank`` (``tau: 0``) and
  ``gdro_prior`` (``noise: prior``, each image's own rollout noise in the implicit reward);
- ``dpo``: Diffusion-DPO as its paper and official code define it (the group's best against its worst, no anchor,
  tied pairs dropped); ``dpo_anchor``: the same plus ``γ`` times the top-1 anchor; ``offline_dpo``: the offline
  recipe public frameworks ship, best against worst of each prompt's N frozen-model images;
- ``sft_best``: flow matching on each group's best member;
- ``lair``: every member's implicit reward regressed on centred softmax weights of its group's rewards;
- ``gdro_rounds``: semi-online GDRO, which every ``--round-steps`` steps re-samples every training prompt's pool
  from its current policy, re-scores it with the same scorer and trains on (see :func:`train_rounds`);
- ``flow_grpo``: the online baseline of :mod:`gdro_core.training.online_grpo`, sampling and scoring as it trains;
  ``diffusion_nft`` and ``awm``: the online forward-process baselines on the same loop
  (:mod:`gdro_core.training.online_matching`).

**Clocks.** Every figure is given in two clocks: wall seconds and CPU seconds (this process's CPU time, all
threads, plus that of any child process). On a shared or loaded machine wall seconds stretch with the load; CPU
seconds much less so, which is why ``--clock cpu`` (the default) is the clock budgets and evaluations follow. A
method's clock counts its training loop (and, online, its sampling and scoring); the benchmark's own work
(evaluations, the EMA copy it evaluates) is left out. The offline methods also pay for their data: their clock
starts at the cost of the ``rollout`` and ``score`` stages, re-measured for every seed on ``--rollout-prompts``
training prompts (same sampler, pool size, batching and scorer as the stages, PNGs and shards written) and
scaled linearly to all of them. ``gdro_rounds`` also pays for every re-sample and re-score it makes, as measured
(all training prompts, nothing scaled), and these come out of its ``--train-budget``.

**Budgets.** Each method trains for ``--train-budget`` seconds of the chosen clock *after* its data cost (zero
for the online methods) and/or ``--budget-steps`` steps, so no method goes untrained however long its rollouts
took. ``--online-budget`` gives the online methods their own budget, e.g. the offline methods' data cost plus
``--train-budget``, so that it trains as long in total as they do and its final reward is a fair target.

**Targets.** Times are reported to reach base + 0.05, base + 0.10, ... (``--target-deltas``): targets above the
base, so no method "reaches" one at step 0. GDRO (and ``gdro_rounds``) against each online method that ran is
compared on the time each takes to reach the online method's final held-out reward, counted only when that reward
is at least base + the smallest delta (else the comparison is reported as not meaningful, with the reason), and at
every common target.

**Seeds.** ``--seeds`` runs every method once per seed (LoRA initialisation, group and noise draws, online
sampling noise); the report gives each figure as mean ± sd over seeds and each online / offline ratio with its
spread. Every ``--eval-every`` seconds of a method's clock and when its budget is spent, the EMA of its adapter is
evaluated as ``gdro train`` evaluates checkpoints (:class:`gdro_core.evaluation.monitor.CheckpointMonitor`) on the
first ``--eval-prompts`` held-out prompts. The final evaluation (and the base's) also reads those images with the
task's second scorer (OCR: ``evaluate.second_reader``; ``second_reward``, n/a when there is none, as for GenEval): a
gain that only fits the training reader's quirks shows there.

**Tasks.** The task is the params file's (``--params``): the OCR world by default, the GenEval shapes world with
``--params params-geneval.yaml`` (after ``make demo-geneval``); rewards are scored as the ``score`` stage scores them.

**The kept checkpoint.** A run's last evaluation is not what ``gdro train`` hands a user: it keeps the checkpoint
with the best corrected score on the validation prompts (``evaluate.keep``, ``evaluate.tie_se``). With ``--kept``
every evaluation also reads the validation prompts as ``gdro train``'s monitor does (``evaluate.checkpoint_prompts``
× ``checkpoint_images_per_prompt``, off every clock), and each run reports the held-out reading of the step that rule
keeps (``kept``), so a method whose reward drifts late is judged on what it would ship too.

**Training data made another way.** ``--data-set KEY=VALUE`` overrides the params of what the methods train on,
not of what they are read by: the stored rollouts and reward table the offline methods train on, the cost they
are charged for it (re-measured with those settings), ``gdro_rounds``' re-samples, and the reward the online
methods score their own samples with. Evaluation and the judge keep ``--params`` and ``--set``. So groups sampled
in fewer steps and ranked by a cheaper reader, or an online method trained on that reader, are raced on the
held-out reward everyone is read by, e.g. after ``gdro rollout`` and ``gdro score`` with the same overrides::

    python benchmarks/cpu_objectives.py --methods gdro flow_grpo --data-set paths.data_dir=data-cheap \
        --data-set rollout.steps=10 --data-set reward.reader_mode=recognizer

Writes ``reports/benchmark/cpu_objectives.json`` and ``cpu_objectives.png`` (reward and corrected score against
CPU and wall seconds, one colour per method, one line per seed) and prints the table. Run after ``dvc repro score``::

    python benchmarks/cpu_objectives.py --seeds 0 1 2                        # all methods
    python benchmarks/cpu_objectives.py --methods gdro flow_grpo dpo --seeds 0 1 2 --train-budget 240 --eval-every 40
    python benchmarks/cpu_objectives.py --params params-geneval.yaml --methods gdro flow_grpo diffusion_nft --seeds 0
"""

from __future__ import annotations

import argparse
import itertools
import math
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import yaml
from PIL import Image

from gdro_core import models
from gdro_core.data.rollout import MANIFEST, Rollouts, generate_rollouts, load_rollouts
from gdro_core.data.scoring import read_table, reward_matrix, score_task_rollouts
from gdro_core.data.store import read_json, write_json
from gdro_core.evaluation.judge import make_task_judge
from gdro_core.evaluation.judge_scores import Judge
from gdro_core.evaluation.monitor import CheckpointMonitor
from gdro_core.layout import Layout
from gdro_core.models.base import FlowModel
from gdro_core.models.lora import lora_state, set_lora_state
from gdro_core.params import Params, Train, check_round_seeds, load_params, reading_params, round_params
from gdro_core.tasks.base import Progress, PromptRecord, Task
from gdro_core.tasks.registry import make_task
from gdro_core.training.checkpoint import load_latest
from gdro_core.training.loop import LoraEma, ema_decay, train
from gdro_core.training.online_grpo import RewardFn, encode_prompts, task_reward, train_online

METHODS: dict[str, dict] = {
    "gdro": {},
    "gdro_top1": {"positions": 1},
    "gdro_rank": {"tau": 0.0},
    "gdro_prior": {"noise": "prior"},
    "dpo": {"objective": "dpo"},
    "dpo_anchor": {"objective": "dpo_anchor"},
    "offline_dpo": {"objective": "offline_dpo"},
    "sft_best": {"objective": "sft_best"},
    "lair": {"objective": "lair"},
    "gdro_rounds": {},
    "flow_grpo": {"objective": "flow_grpo"},
    "diffusion_nft": {"objective": "diffusion_nft"},
    "awm": {"objective": "awm"},
}
ONLINE = {"flow_grpo", "diffusion_nft", "awm"}
ROUNDS = {"gdro_rounds"}  # offline objectives that re-sample their data from the policy as they train
RACERS = ("gdro", "gdro_rounds")  # the offline methods raced against every online one
LABELS = {"gdro": "GDRO", "gdro_rounds": "GDRO rounds", "flow_grpo": "Flow-GRPO", "diffusion_nft": "DiffusionNFT",
          "awm": "AWM"}
NEVER = 10**9  # a step count no run reaches: the budget stops every run, and nothing is checkpointed but round ends
OUT_NAME = "cpu_objectives"
SCORES = ("reward", "corrected", "velocity_norm_ratio")
FINAL_SCORES = (*SCORES, "second_reward")  # the second reader reads the final evaluation only (~1 s an image)
CLOCKS = {"cpu": "cpu_seconds", "wall": "seconds"}


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class Stopwatch:
    """Wall and CPU seconds since ``start``."""

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), cpu_seconds()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall0, cpu_seconds() - self.cpu0


class BudgetReached(Exception):
    """Raised from the training loop's logger once a method has spent its budget."""


@dataclass
class Shared:
    """Everything the methods share: params, layout, data, prompts, the task (its scorer), judge, base scores (and
    second reward)."""

    lay: Layout
    data: Rollouts
    rewards: torch.Tensor
    train_prompts: list[PromptRecord]
    eval_prompts: list[PromptRecord]
    task: Task
    judge: Judge
    reward_fn: RewardFn
    base: dict[str, float | None]
    data_lay: Layout  # the training data's params (``--data-set``): its sampler, pool and scorer
    data_task: Task  # what scores the training data: the offline data's reader and the online methods' reward
    val_prompts: list[PromptRecord] | None = None  # --kept: the validation prompts gdro train keeps a checkpoint by

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
    return models.load_model(lay.params, lay.base_dir)


class TwoReaderTask:
    """The task the monitor scores with. Once armed, it also scores the next evaluation's images with the task's
    second scorer (OCR: the second reader): those exact images, and only where asked (the final evaluation and the
    base's), since it is slow. Everything else is the task's own."""

    def __init__(self, task: Task):
        self.task = task
        self.armed = False
        self.second: dict[str, float] = {}

    def __getattr__(self, name: str):
        return getattr(self.task, name)

    def reward(self, images: list[Image.Image], records: Sequence, progress: Progress | None = None) -> pd.DataFrame:
        if self.armed:
            self.armed = False
            self.second = self.task.second_opinion(images, records)  # {} when the task has no second scorer
        return self.task.reward(images, records, progress)


def read_twice(monitor: CheckpointMonitor, evaluate: Callable[[], None]) -> float | None:
    """Run one of ``monitor``'s evaluations with its task's second reader armed; that reader's mean reward (None:
    no second reader installed or configured)."""
    task: TwoReaderTask = monitor.task
    task.armed, task.second = True, {}
    try:
        evaluate()
    finally:
        task.armed = False
    return task.second.get("second_reward")


def make_monitor(model: FlowModel, shared: Shared, workdir: Path) -> CheckpointMonitor:
    """The evaluation ``gdro train`` runs at checkpoints, on the benchmark's held-out prompts."""
    p = shared.params
    return CheckpointMonitor(
        model, shared.eval_prompts, TwoReaderTask(shared.task), shared.judge, judge_task=p.judge_task,
        seed=p.evaluate.seed, steps=p.sampler.steps, guidance=p.sampler.guidance, batch_size=p.sampler.batch_size,
        keep="last", workdir=workdir, log=lambda step, metrics: None,
    )


def make_val_monitor(model: FlowModel, shared: Shared, workdir: Path) -> CheckpointMonitor | None:
    """``gdro train``'s checkpoint monitor (validation prompts, its keeping rule), where ``--kept`` asks for it."""
    if shared.val_prompts is None:
        return None
    p = shared.params
    return CheckpointMonitor(
        model, shared.val_prompts, shared.task, shared.judge, judge_task=p.judge_task, seed=p.evaluate.seed,
        steps=p.sampler.steps, guidance=p.sampler.guidance, batch_size=p.sampler.batch_size, keep=p.evaluate.keep,
        workdir=workdir, log=lambda step, metrics: None, per_prompt=p.evaluate.checkpoint_images_per_prompt,
        tie_se=p.evaluate.tie_se,
    )


def rollout_batch(p: Params) -> int:
    """Prompts per sampler batch, as the rollout stage batches them."""
    return max(1, p.sampler.batch_size // p.rollout.images_per_prompt)


def sample_and_score(model: FlowModel, p: Params, task: Task, prompts: Sequence[PromptRecord], seed: int,
                     out_dir: Path, fingerprint: str) -> tuple[dict, pd.DataFrame, dict[str, float]]:
    """The rollout and score stages' work on ``prompts`` from rollout seed ``seed`` (same sampler, pool size,
    batching and scorer; PNGs and shards written): the manifest, the reward table and the seconds each part took."""
    watch = Stopwatch()
    manifest = generate_rollouts(model, prompts, p.rollout.images_per_prompt, seed, p.rollout_steps,
                                 p.sampler.guidance, rollout_batch(p), out_dir, fingerprint)
    gen_wall, gen_cpu = watch.read()
    table = score_task_rollouts(manifest["rows"], out_dir, task)
    all_wall, all_cpu = watch.read()
    return manifest, table, {"generation_s": gen_wall, "scoring_s": all_wall - gen_wall,
                             "generation_cpu_s": gen_cpu, "scoring_cpu_s": all_cpu - gen_cpu}


def measure_offline(model: FlowModel, lay: Layout, task: Task, prompts: list[PromptRecord], n_prompts: int,
                    total_prompts: int) -> dict[str, float]:
    """Wall and CPU seconds the rollout and score stages take for ``total_prompts``, from ``n_prompts``, scaled."""
    p = lay.params
    # at least one full sampler batch: a half-empty batch costs nearly as much and would double the per-image cost
    m = max(1, min(max(n_prompts, rollout_batch(p)), len(prompts)))
    with tempfile.TemporaryDirectory() as tmp:
        _, _, cost = sample_and_score(model, p, task, prompts[:m], p.rollout.seed, Path(tmp), "benchmark")
    scale = total_prompts / m
    return {**{k: v * scale for k, v in cost.items()},
            "measured_prompts": m, "total_prompts": total_prompts, "images_per_prompt": p.rollout.images_per_prompt}


class Tracker:
    """The training loop's logger: keeps the method's two clocks, its EMA and its curve; stops it at the budget."""

    def __init__(self, model: FlowModel, monitor: CheckpointMonitor, cfg: Train, base: dict[str, float],
                 offset: dict[str, float], args: argparse.Namespace, online: bool = False,
                 val_monitor: CheckpointMonitor | None = None):
        self.model, self.monitor, self.cfg = model, monitor, cfg
        self.val_monitor = val_monitor  # --kept: reads the validation prompts at every evaluation too
        if val_monitor is not None:
            val_monitor.evaluate_base()  # as gdro train does: the base can be kept
        self.offset = offset  # {"seconds": wall, "cpu_seconds": cpu} spent before training starts
        self.key = CLOCKS[args.clock]
        budget = args.online_budget if online and args.online_budget > 0 else args.train_budget
        self.budget = self.offset[self.key] + budget if budget > 0 else float("inf")
        self.budget_steps, self.eval_every = args.budget_steps, args.eval_every
        self.elapsed = {"seconds": 0.0, "cpu_seconds": 0.0}
        self.generation = self.scoring = 0.0
        self.steps = 0
        self.ema: LoraEma | None = None
        self.last_parts: dict[str, float] = {}
        self.second_reward: float | None = None  # the second reader's, on the final evaluation's images
        self.curve = [{**offset, "step": 0, **{k: v for k, v in base.items() if k in SCORES}}]
        self.next_eval = self.offset[self.key] + self.eval_every if self.eval_every > 0 else float("inf")
        self.watch = Stopwatch()

    def start(self) -> None:
        self.watch = Stopwatch()

    def pause(self) -> None:
        wall, cpu = self.watch.read()
        self.elapsed["seconds"] += wall
        self.elapsed["cpu_seconds"] += cpu

    def clock(self, key: str | None = None) -> float:
        key = key or self.key
        return self.offset[key] + self.elapsed[key]

    def charge(self, cost: dict[str, float]) -> None:
        """Add data cost paid mid-run (a round's re-sample and re-score) to the clock, as the offline data cost
        is added before training: to the offset, not to the training time. The budget stays where it was."""
        self.offset = {"seconds": self.offset["seconds"] + cost["generation_s"] + cost["scoring_s"],
                       "cpu_seconds": self.offset["cpu_seconds"] + cost["generation_cpu_s"] + cost["scoring_cpu_s"]}
        self.generation += cost["generation_s"]
        self.scoring += cost["scoring_s"]

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.pause()
        self.steps = step
        self.generation += metrics.get("time/generation_s", 0.0)
        self.scoring += metrics.get("time/scoring_s", 0.0)
        self.last_parts = metrics
        live = lora_state(self.model.transformer)
        if self.ema is None:
            self.ema = LoraEma(live)
        else:
            self.ema.update(live, ema_decay(step, self.cfg.ema_rate, self.cfg.ema_max_decay))
        done = self.clock() >= self.budget or (self.budget_steps > 0 and step >= self.budget_steps)
        if done or self.clock() >= self.next_eval:
            if done:
                self.second_reward = read_twice(self.monitor, lambda: self.monitor(step, self.ema.shadow))
            else:
                self.monitor(step, self.ema.shadow)
            if self.val_monitor is not None:
                self.val_monitor(step, self.ema.shadow)
            row = self.monitor.curve[self.monitor.curve["step"] == step].iloc[-1]
            self.curve.append({"seconds": self.clock("seconds"), "cpu_seconds": self.clock("cpu_seconds"),
                               "step": step, **{k: float(row[k]) for k in SCORES}})
            while self.next_eval <= self.clock():
                self.next_eval += self.eval_every
        if done:
            raise BudgetReached
        self.start()


def live_policy(model: FlowModel, ckpt_dir: Path) -> None:
    """Put the live LoRA of the newest checkpoint in ``model``: ``train()`` ends with its EMA in the model, but a
    round samples from the adapter being trained, the one the next round resumes from."""
    weights, _ = load_latest(ckpt_dir)
    set_lora_state(model.transformer, {k.removeprefix("lora."): v for k, v in weights.items() if k.startswith("lora.")})


def train_rounds(shared: Shared, cfg: Train, args: argparse.Namespace, run_dir: Path, tracker: Tracker,
                 rounds: list[dict]) -> None:
    """Semi-online GDRO: ``--round-steps`` steps on the current data, then every training prompt's pool re-sampled
    from the live policy and re-scored by the same scorer, and on; until the tracker's budget stops it.

    ``train()`` trains on one data set it is given, and attaches a fresh adapter to its model (a second call on the
    same model would attach a second one), so it cannot take new data mid-run: each round calls it again, on a
    freshly loaded base, resuming from the run's checkpoint directory (LoRA, the loop's EMA, AdamW state, the
    group generator and the step), as an interrupted ``gdro train`` resumes. The round's sampling uses the sampler
    settings, pool size and batching of the rollout stage, on as many training prompts as the offline data holds,
    with rollout seeds offset by the round number (:func:`gdro_core.params.round_params`; the offline data is
    round 1) so every round draws new noise. Its generation and scoring, measured on all those prompts (nothing
    scaled: every one is really re-sampled), are charged to the clock as the offline data cost is
    (:meth:`Tracker.charge`); reloading the base and the new shards is not, as the first load is not.
    Each round's cost, seeds and how far its data moved are appended to ``rounds``.
    """
    p = shared.data_lay.params  # re-sampled and re-scored as the offline data was made
    data, rewards = shared.data, shared.rewards
    prompts = shared.train_prompts[: data.shape[0]]  # the prompts the offline data was sampled for
    check_round_seeds(p, len(prompts))
    ckpt = run_dir / "ckpt"
    for r in itertools.count(1):  # round 1 trains on the offline data; the budget raises BudgetReached in some round
        train(tracker.model, data, rewards, cfg.model_copy(update={"steps": r * args.round_steps}), ckpt, tracker)
        tracker.pause()
        policy = tracker.model
        live_policy(policy, ckpt)
        seed = round_params(p, r + 1).rollout.seed
        out_dir = run_dir / f"round{r + 1}"
        manifest, table, cost = sample_and_score(policy, p, shared.data_task, prompts, seed, out_dir,
                                                 f"benchmark-round{r + 1}")
        tracker.charge(cost)
        new_data = load_rollouts(out_dir)
        new_rewards = reward_matrix(table, *new_data.shape)
        rounds.append({"round": r + 1, "after_step": tracker.steps, "first_seed": seed, "images": len(manifest["rows"]),
                       **cost, "mean_reward": float(new_rewards.mean()),
                       "latent_change": float((new_data.latents - data.latents).abs().mean())})
        data, rewards = new_data, new_rewards
        tracker.model = tracker.monitor = tracker.val_monitor = policy = None  # one model in memory at a time
        tracker.model = load_model(shared.lay)
        tracker.monitor = make_monitor(tracker.model, shared, run_dir / "monitor")  # the same curve, read back
        tracker.val_monitor = make_val_monitor(tracker.model, shared, run_dir / "val-monitor")
        tracker.start()


def run_method(name: str, shared: Shared, args: argparse.Namespace, workdir: Path, seed: int,
               offline: dict[str, float]) -> dict:
    """Train one method from the base under the budget with ``seed``; its curve, step count and time split."""
    p = shared.params
    update = {**METHODS[name], "steps": NEVER, "checkpoint_every": NEVER, "log_every": 1, "seed": seed}
    cfg = p.train.model_copy(update=update)
    torch.manual_seed(seed)  # the same LoRA initialisation for every method of a seed
    model = load_model(shared.lay)
    online = name in ONLINE
    offset = ({"seconds": 0.0, "cpu_seconds": 0.0} if online else
              {"seconds": offline["generation_s"] + offline["scoring_s"],
               "cpu_seconds": offline["generation_cpu_s"] + offline["scoring_cpu_s"]})
    run_dir = workdir / f"seed{seed}" / name
    tracker = Tracker(model, make_monitor(model, shared, run_dir / "monitor"), cfg, shared.base, offset, args, online,
                      make_val_monitor(model, shared, run_dir / "val-monitor"))
    rounds: list[dict] = []
    del model  # the tracker holds it (and a round replaces it)
    tracker.start()
    try:
        if name in ROUNDS:
            train_rounds(shared, cfg, args, run_dir, tracker, rounds)
        elif online:
            watch = Stopwatch()
            cond, null = encode_prompts(tracker.model, shared.train_prompts, p.sampler.batch_size)
            tracker.generation += watch.read()[0]
            train_online(tracker.model, shared.train_prompts, cond, null, shared.reward_fn, cfg, run_dir / "ckpt",
                         tracker, guidance=p.sampler.guidance)
        else:
            train(tracker.model, shared.data, shared.rewards, cfg, run_dir / "ckpt", tracker)
    except BudgetReached:
        pass
    if online:
        time_split = {"generation_s": tracker.generation, "scoring_s": tracker.scoring,
                      "training_s": tracker.elapsed["seconds"] - tracker.generation - tracker.scoring}
    else:  # a round's re-samples add to the offline data cost (zero for the other offline methods)
        time_split = {"generation_s": offline["generation_s"] + tracker.generation,
                      "scoring_s": offline["scoring_s"] + tracker.scoring, "training_s": tracker.elapsed["seconds"]}
    time_split["total_s"] = tracker.clock("seconds")
    time_split["total_cpu_s"] = tracker.clock("cpu_seconds")
    time_split["training_cpu_s"] = tracker.elapsed["cpu_seconds"]
    final = tracker.curve[-1]
    kept, val_curve = None, None
    if tracker.val_monitor is not None:  # the held-out reading of the step gdro train would keep
        step = int(tracker.val_monitor.kept_step())
        kept = next(q for q in tracker.curve if q["step"] == step)
        val_curve = [{"step": int(q["step"]), **{k: float(q[k]) for k in SCORES}}
                     for q in tracker.val_monitor.curve.to_dict("records")]
    return {
        "seed": seed,
        "train": {k: v for k, v in cfg.model_dump().items() if k in METHODS[name] or k == "objective"},
        "online": online,
        "steps": tracker.steps,
        "time": time_split,
        "clock_offset": tracker.offset,  # data cost charged to its clocks: offline, plus every round's re-sample
        "rounds": rounds,
        "final": {**{k: final[k] for k in SCORES}, "second_reward": tracker.second_reward},
        "kept": kept,
        "val_curve": val_curve,  # --kept: the validation readings the kept step was chosen by
        "last_parts": {k: v for k, v in tracker.last_parts.items() if k.startswith("train/")},
        "curve": tracker.curve,
    }


def time_to_reach(curve: list[dict], target: float) -> dict[str, float] | None:
    """Wall and CPU seconds of the first evaluation whose reward is at least ``target``."""
    for point in sorted(curve, key=lambda q: q["cpu_seconds"]):
        if point["reward"] >= target - 1e-9:
            return {"seconds": point["seconds"], "cpu_seconds": point["cpu_seconds"], "step": point["step"]}
    return None


def targets_reached(run: dict, base: float, deltas: list[float]) -> dict[str, dict | None]:
    return {f"{d:+.2f}": time_to_reach(run["curve"], base + d) for d in deltas}


def compare(runs: dict[str, dict], base: float, deltas: list[float], key: str, ours: str = "gdro",
            online: str = "flow_grpo") -> dict | None:
    """One seed's offline method ``ours`` against ``online``: the time ``online`` takes to reach its own final
    reward over the time ``ours`` takes to reach it, and the same ratio at every target (None where one never got
    there). Not counted, with the reason, when that final reward is below base + the smallest delta. ``ours`` and
    ``online`` name methods, or any two runs of ``runs`` (``race_overlay`` labels them)."""
    if ours not in runs or online not in runs:
        return None
    name = {m: LABELS.get(m, m) for m in (ours, online)}
    mine, theirs = runs[ours], runs[online]
    final = theirs["final"]["reward"]
    out: dict = {"offline": ours, "online": online, "target_reward": final, "clock": key}
    if final < base + min(deltas) - 1e-9:
        out["reason"] = (f"{name[online]}'s final reward {final:.3f} is below base + {min(deltas):.2f} "
                         f"({base + min(deltas):.3f}): no improvement to race to")
        out["ratio"] = None
    else:
        t_mine, t_theirs = time_to_reach(mine["curve"], final), time_to_reach(theirs["curve"], final)
        out[ours], out[online] = t_mine, t_theirs
        out["ratio"] = t_theirs[key] / t_mine[key] if t_mine and t_theirs else None
        if t_mine is None:
            out["reason"] = f"{name[ours]} did not reach {name[online]}'s final reward within its budget"
    per_target = {}
    for d in deltas:
        a, b = time_to_reach(mine["curve"], base + d), time_to_reach(theirs["curve"], base + d)
        per_target[f"{d:+.2f}"] = b[key] / a[key] if a and b else None
    out["ratio_at_target"] = per_target
    return out


def race(per_seed: dict[int, dict[str, dict]], base: float, deltas: list[float], key: str, ours: str,
         online: str) -> dict | None:
    """:func:`compare` on every seed, as mean ± sd over seeds (None when the two did not both run)."""
    comps = [c for c in (compare(per_seed[s], base, deltas, key, ours, online) for s in per_seed) if c is not None]
    if not comps:
        return None
    return {"to_final": mean_sd([c["ratio"] for c in comps]),
            "reasons": sorted({c["reason"] for c in comps if c.get("reason")}),
            "at_target": {t: mean_sd([c["ratio_at_target"][t] for c in comps]) for t in comps[0]["ratio_at_target"]},
            "clock": key, "per_seed": comps}


def mean_sd(values: list[float | None]) -> dict:
    """Mean and sample sd of the values that exist, and how many of them do."""
    xs = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return {"mean": statistics.fmean(xs) if xs else None,
            "sd": statistics.stdev(xs) if len(xs) > 1 else (0.0 if xs else None), "n": len(xs), "of": len(values)}


def aggregate(per_seed: dict[int, dict[str, dict]], base: float, deltas: list[float], key: str) -> dict:
    """Per method: final scores, steps and time to each target as mean ± sd over seeds."""
    names = list(next(iter(per_seed.values())))
    out = {}
    for name in names:
        runs = [per_seed[s][name] for s in per_seed]
        entry = {k: mean_sd([r["final"].get(k) for r in runs]) for k in FINAL_SCORES}
        entry["steps"] = mean_sd([float(r["steps"]) for r in runs])
        kept = [r.get("kept") for r in runs]
        entry["kept"] = {k: mean_sd([q[k] if q else None for q in kept]) for k in ("step", *SCORES)}
        entry["total_cpu_s"] = mean_sd([r["time"]["total_cpu_s"] for r in runs])
        entry["total_s"] = mean_sd([r["time"]["total_s"] for r in runs])
        reached = [targets_reached(r, base, deltas) for r in runs]
        entry["time_to_target"] = {
            t: {clock: mean_sd([(x[t] or {}).get(clock) for x in reached]) for clock in CLOCKS.values()}
            for t in reached[0]
        }
        out[name] = entry
    onlines = [m for m in METHODS if m in ONLINE]
    vs_online: dict[str, dict[str, dict]] = {}  # {offline method: {online method: race}}, pairs that both ran
    for ours in RACERS:
        races = {m: race(per_seed, base, deltas, key, ours, m) for m in onlines}
        if any(races.values()):
            vs_online[ours] = {m: r for m, r in races.items() if r is not None}
    legacy = vs_online.get("gdro", {}).get("flow_grpo")  # the key earlier reports (and their readers) know
    ratio = None if legacy is None else {"to_flow_grpo_final": legacy["to_final"], "reasons": legacy["reasons"],
                                         "at_target": legacy["at_target"], "clock": key}
    return {"methods": out, "vs_online": vs_online, "gdro_vs_flow_grpo": ratio,
            "per_seed_comparison": legacy["per_seed"] if legacy else []}


def fmt(stat: dict, digits: int = 3) -> str:
    if stat["mean"] is None:
        return f"n/a (0/{stat['of']})"
    text = f"{stat['mean']:.{digits}f}±{stat['sd']:.{digits}f}"
    return text + (f" ({stat['n']}/{stat['of']})" if stat["n"] < stat["of"] else "")


def summary_lines(report: dict) -> list[str]:
    agg, key = report["aggregate"], report["settings"]["clock"]
    clock = CLOCKS[key]
    targets = list(next(iter(agg["methods"].values()))["time_to_target"])
    second = report["settings"]["second_reader"]
    base_second = report["base"].get("second_reward")
    lines = [f"mean ± sd over seeds {report['settings']['seeds']}; times in {key} seconds "
             f"(offline methods include their rollout + scoring cost); (n/N) = seeds that reached it; "
             f"reward 2 = the final held-out images read by the second reader ({second})",
             f"{'method':<13} {'steps':>11} {'reward':>13} {'reward 2':>13} {'corrected':>13} {'v-ratio':>11} "
             + " ".join(f"{'to base' + t:>18}" for t in targets)]
    for name, e in agg["methods"].items():
        lines.append(f"{name:<13} {fmt(e['steps'], 0):>11} {fmt(e['reward']):>13} "
                     f"{fmt(e['second_reward']) if e['second_reward']['n'] else 'n/a':>13} {fmt(e['corrected']):>13} "
                     f"{fmt(e['velocity_norm_ratio'], 2):>11} "
                     + " ".join(f"{fmt(e['time_to_target'][t][clock], 0):>18}" for t in targets))
    lines.append(f"{'base':<13} {'0':>11} {report['base']['reward']:>13.3f} "
                 f"{'n/a' if base_second is None else f'{base_second:.3f}':>13} {report['base']['corrected']:>13.3f}")
    for name, e in agg["methods"].items():
        kept = e.get("kept")
        if kept and kept["reward"]["n"]:
            lines.append(f"{name}: kept by validation corrected score (as gdro train keeps): step {fmt(kept['step'], 0)}, "
                         f"reward {fmt(kept['reward'])}, corrected {fmt(kept['corrected'])}")
    off = report["offline"]
    lines.append("offline data cost per seed: generation " + fmt(off["generation_s"], 1) + " s wall, "
                 + fmt(off["generation_cpu_s"], 1) + " s CPU; scoring " + fmt(off["scoring_s"], 1) + " s wall, "
                 + fmt(off["scoring_cpu_s"], 1) + " s CPU")
    if not agg["vs_online"]:
        lines.append(f"online / offline time ratios: n/a (run one of {', '.join(RACERS)} and an online method "
                     f"({', '.join(m for m in METHODS if m in ONLINE)}) to compare them)")
    for ours, races in agg["vs_online"].items():
        for online, r in races.items():
            lines.append(f"time to {LABELS[online]}'s final reward, {online} / {ours} ({key} s): "
                         f"{fmt(r['to_final'], 2)}")
            for reason in r["reasons"]:
                lines.append(f"  not counted: {reason}")
            lines.append("  at each target: " + ", ".join(f"base{t}: {fmt(s, 2)}" for t, s in r["at_target"].items()))
    rounds = [r for runs in report["per_seed"].values() for run in runs.values() for r in run.get("rounds", [])]
    if rounds:
        lines.append(f"gdro_rounds: {len(rounds)} re-samples over {len(report['per_seed'])} seed(s), each "
                     + fmt(mean_sd([r["generation_s"] + r["scoring_s"] for r in rounds]), 1) + " s wall, "
                     + fmt(mean_sd([r["generation_cpu_s"] + r["scoring_cpu_s"] for r in rounds]), 1)
                     + f" s CPU (every {report['settings']['round_steps']} steps)")
    return lines


def plot(report: dict, path: Path) -> Path:
    """Reward and corrected score against CPU and wall seconds, one colour per method, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(next(iter(report["per_seed"].values())))
    for row, key in enumerate(("reward", "corrected")):
        for col, (clock, label) in enumerate((("cpu_seconds", "CPU seconds"), ("seconds", "wall seconds"))):
            ax = axes[row, col]
            for i, name in enumerate(names):
                for j, runs in enumerate(report["per_seed"].values()):
                    curve = pd.DataFrame(runs[name]["curve"])
                    ax.plot(curve[clock], curve[key], marker="o", markersize=2, color=colours[i % len(colours)],
                            alpha=0.8, label=name if j == 0 else None)
            ax.axhline(report["base"][key], linestyle="--", color="grey", label="base")
            ax.set_xlabel(f"{label} (offline methods start at their rollout + scoring cost)")
            ax.set_title(f"held-out {key}")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("."), help="project root (holds params.yaml and the DVC outputs)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file, relative to --root")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="params override, e.g. --set reward.reader_mode=recognizer (repeatable)")
    ap.add_argument("--kept", action="store_true",
                    help="also read the validation prompts at every evaluation and report the held-out reading of the "
                         "checkpoint gdro train would keep (evaluate.keep); costs evaluation time, no method's clock")
    ap.add_argument("--data-set", dest="data_overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="params override of what the methods train on only (the offline data's directory, sampler "
                         "steps and reader; the online methods' reward), e.g. --data-set paths.data_dir=data-cheap "
                         "--data-set reward.reader_mode=recognizer; evaluation keeps --params and --set (repeatable)")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one run of every method per seed")
    ap.add_argument("--clock", choices=list(CLOCKS), default="cpu", help="the clock budgets and evaluations follow")
    ap.add_argument("--train-budget", type=float, default=360.0,
                    help="seconds of --clock each method trains after its own data cost (0 = step budget only)")
    ap.add_argument("--online-budget", type=float, default=0.0,
                    help="seconds of --clock each online method trains (0 = --train-budget); e.g. an offline method's "
                         "data cost + --train-budget, so both get the same total clock")
    ap.add_argument("--budget-steps", type=int, default=0, help="also stop after this many steps (0 = no step budget)")
    ap.add_argument("--eval-every", type=float, default=60.0, help="seconds of a method's clock between evaluations")
    ap.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts per evaluation")
    ap.add_argument("--rollout-prompts", type=int, default=8,
                    help="training prompts the offline cost is measured on (at least one full sampler batch)")
    ap.add_argument("--round-steps", type=int, default=100,
                    help="gdro_rounds: training steps between re-samples of the training prompts from the policy")
    ap.add_argument("--target-deltas", nargs="+", type=float, default=[0.05, 0.10, 0.15, 0.20, 0.25, 0.30],
                    help="reward targets above the base's held-out reward")
    ap.add_argument("--out-dir", type=Path, help="default: <reports_dir>/benchmark (with --merge: the first report's)")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="REPORT",
                    help="instead of running: merge complete reports of the same settings on different seeds into "
                         "one (run seeds in parallel with their own --seeds and --out-dir, then merge)")
    args = ap.parse_args(argv)
    if args.train_budget <= 0 and args.budget_steps <= 0:
        ap.error("give a positive --train-budget or --budget-steps: otherwise no method would stop")
    if args.round_steps <= 0:
        ap.error(f"--round-steps must be positive (got {args.round_steps}): gdro_rounds re-samples its data every "
                 "--round-steps training steps")
    if min(args.target_deltas) <= 0:
        ap.error("--target-deltas must be positive: a target at or below the base is met before any training")
    for flag, items in (("--set", args.overrides), ("--data-set", args.data_overrides)):
        for item in items:
            if "=" not in item:
                ap.error(f"{flag} {item!r}: expected KEY=VALUE, e.g. reward.reader_mode=recognizer")
    return args


def build_report(args: argparse.Namespace, p: Params, data_p: Params, task: Task, base: dict[str, float | None],
                 offline_runs: list[dict], per_seed: dict[int, dict[str, dict]], deltas: list[float], total: Stopwatch,
                 complete: bool) -> dict:
    """The report over the seeds (and, for a partial report, the methods) run so far."""
    done = {s: runs for s, runs in per_seed.items() if runs}
    names = set.intersection(*(set(runs) for runs in done.values())) if done else set()
    common = {s: {n: r for n, r in runs.items() if n in names} for s, runs in done.items()}
    wall, cpu = total.read()
    return {
        "complete": complete,
        "settings": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "device": p.model.device, "torch_threads": torch.get_num_threads(),
            "task": p.task, "reader_mode": reading_params(p).reward.reader_mode, "sampler_steps": p.sampler.steps,
            "rollout_steps": data_p.rollout_steps, "data_reader_mode": data_p.reward.reader_mode,
            "data_dir": data_p.paths.data_dir,
            "second_reader": second_scorer(task),
        },
        "offline": {k: mean_sd([o[k] for o in offline_runs])
                    for k in ("generation_s", "scoring_s", "generation_cpu_s", "scoring_cpu_s")},
        "offline_runs": offline_runs,
        "base": base,
        "per_seed": {str(s): v for s, v in done.items()},
        "aggregate": aggregate(common, base["reward"], deltas, CLOCKS[args.clock]) if names else None,
        "benchmark_cost": {"wall_s": wall, "cpu_s": cpu},
    }


def second_scorer(task: Task) -> str:
    """The name of what scores the final images a second time (OCR: the other reader), "none" where nothing does."""
    name = getattr(task, "second_reader", None)
    return (name() if callable(name) else "") or "none"


MERGE_SAME = ("clock", "train_budget", "online_budget", "budget_steps", "eval_every", "eval_prompts",
              "rollout_prompts", "target_deltas", "round_steps", "overrides", "data_overrides", "kept", "params",
              "reader_mode", "sampler_steps", "second_reader")
"""Settings every merged report must share: otherwise their seeds did not run the same benchmark. The methods may
differ: reports of the same seed with other methods (e.g. the offline variants run later) join that seed's runs."""


def merge_reports(paths: list[Path]) -> dict:
    """One report from reports of the same benchmark on different seeds (e.g. one process per core, each with
    ``--seeds`` of its own) or on other methods of the same seeds: their per-seed runs and data costs side by side,
    aggregated as one run's are, over the methods every seed finished. A partial report (``*.partial.json``, its
    run stopped) makes the merge partial."""
    reports = [read_json(path) for path in paths]
    first = reports[0]
    per_seed: dict[int, dict[str, dict]] = {}
    for path, report in zip(paths, reports, strict=True):
        differ = [k for k in MERGE_SAME if report["settings"].get(k) != first["settings"].get(k)]
        if differ:
            raise SystemExit(f"--merge: {path} differs from {paths[0]} in {', '.join(differ)}: its seeds ran "
                             "another benchmark; merge only reports of the same settings")
        if report["base"] != first["base"]:
            raise SystemExit(f"--merge: {path} evaluated another base ({report['base']} against {first['base']}): "
                             "merge only reports of the same base model, data and held-out prompts")
        for seed, runs in report["per_seed"].items():
            twice = sorted(set(runs) & set(per_seed.get(int(seed), {})))
            if twice:
                raise SystemExit(f"--merge: seed {seed} of {', '.join(twice)} is in more than one report; "
                                 "each seed of each method once")
            per_seed.setdefault(int(seed), {}).update(runs)
    offline_runs = [run for report in reports for run in report["offline_runs"]]
    names = set.intersection(*(set(runs) for runs in per_seed.values()))
    common = {s: {n: r for n, r in runs.items() if n in names} for s, runs in sorted(per_seed.items())}
    settings = first["settings"]
    methods = [m for m in METHODS if any(m in runs for runs in per_seed.values())]
    return {
        "complete": all(report.get("complete") for report in reports),
        "settings": {**settings, "methods": methods, "seeds": sorted(per_seed),
                     "merged_from": [str(path) for path in paths]},
        "offline": {k: mean_sd([o[k] for o in offline_runs])
                    for k in ("generation_s", "scoring_s", "generation_cpu_s", "scoring_cpu_s")},
        "offline_runs": offline_runs,
        "base": first["base"],
        "per_seed": {str(s): v for s, v in sorted(per_seed.items())},
        "aggregate": aggregate(common, first["base"]["reward"], sorted(settings["target_deltas"]),
                               CLOCKS[settings["clock"]]),
        "benchmark_cost": {"wall_s": max(r["benchmark_cost"]["wall_s"] for r in reports),
                           "cpu_s": sum(r["benchmark_cost"]["cpu_s"] for r in reports)},
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.merge:
        report = merge_reports(args.merge)
        out_dir = args.out_dir or args.merge[0].parent
        write_json(out_dir / f"{OUT_NAME}.json", report)
        plot(report, out_dir / f"{OUT_NAME}.png")
        print("\n".join(summary_lines(report)))
        if not report["complete"]:
            print("partial: a merged run did not finish; the table holds the methods every seed finished")
        print(f"merged {len(args.merge)} reports, seeds {report['settings']['seeds']}; written to "
              f"{out_dir / OUT_NAME}.json and .png")
        return report
    root = args.root.resolve()
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.overrides)}
    data_overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.data_overrides)}
    params_file = args.params if args.params.is_absolute() else root / args.params
    params = load_params(params_file, overrides)
    lay = Layout(root=root, params=params)
    data_lay = Layout(root=root, params=load_params(params_file, {**overrides, **data_overrides})) if data_overrides else lay
    missing = sorted(set(missing_outputs(lay) + missing_outputs(data_lay)))
    if not missing and data_lay is not lay and data_lay.prompts("train").read_bytes() != lay.prompts("train").read_bytes():
        raise SystemExit(f"--data-set: {data_lay.prompts('train')} is not {lay.prompts('train')}: the offline data "
                         "was made for other training prompts; roll out the same prompt set into that directory")
    if args.kept and not lay.prompts("val").exists():
        missing.append(lay.prompts("val"))  # --kept keeps by the validation prompts (prompts.n_val > 0)
    if missing:
        raise SystemExit(
            "the benchmark needs the pipeline's outputs (base model, rollouts, reward table); missing: "
            + ", ".join(str(m) for m in missing) + ". Run `make demo` (or `dvc repro score`) first."
        )
    p, data_p = params, data_lay.params
    out_dir = args.out_dir or lay.reports_dir / "benchmark"
    data = load_rollouts(data_lay.rollout_dir)
    scored = read_table(data_lay.rewards, read_json(data_lay.rollout_dir / MANIFEST)["fingerprint"])  # as train refuses it
    rewards = reward_matrix(scored, *data.latents.shape[:2])
    task = make_task(reading_params(p))  # as the evaluate stage reads held-out images (evaluate.reader_mode)
    # and as the score stage scores the training data (the same reader by default)
    data_task = task if reading_params(data_p) is data_p and not data_overrides else make_task(data_p)
    offline_methods = [m for m in args.methods if m not in ONLINE]
    train_prompts = task.read_prompts(lay.prompts("train"))
    eval_prompts = task.read_prompts(lay.prompts("test"))[: args.eval_prompts]
    deltas = sorted(args.target_deltas)
    total = Stopwatch()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        base_model = load_model(lay)
        shared = Shared(lay, data, rewards, train_prompts, eval_prompts, task, make_task_judge(task, p.judge),
                        task_reward(data_task, train_prompts), {}, data_lay, data_task,
                        task.read_prompts(lay.prompts("val"))[: p.evaluate.checkpoint_prompts] if args.kept else None)
        base_monitor = make_monitor(base_model, shared, workdir / "base")
        # also warms up the sampler and the reader before anything is timed
        second = read_twice(base_monitor, base_monitor.evaluate_base)
        if data_task is not task:  # and the training data's reader, whose loading no method should pay for
            height, width, channels = data_p.image_shape
            data_task.reward([Image.new("RGB" if channels == 3 else "L", (width, height), "white")], train_prompts[:1])
        shared.base = {**{k: float(base_monitor.curve[k].iloc[0]) for k in SCORES}, "second_reward": second}
        print(f"base: reward {shared.base['reward']:.3f}, corrected {shared.base['corrected']:.3f}, second reader "
              + ("n/a" if second is None else f"{second:.3f}"), flush=True)
        per_seed: dict[int, dict[str, dict]] = {}
        offline_runs = []
        for seed in args.seeds:
            offline = {}  # only offline methods pay for data: an online-only run does not measure it
            if offline_methods:
                offline = measure_offline(base_model, data_lay, data_task, train_prompts, args.rollout_prompts,
                                          data.latents.shape[0])
                offline_runs.append(offline)
                print(f"seed {seed}: offline rollout + score ({offline['total_prompts']} prompts x "
                      f"{offline['images_per_prompt']} images, measured on {offline['measured_prompts']}): "
                      f"{offline['generation_s']:.1f} + {offline['scoring_s']:.1f} s wall, "
                      f"{offline['generation_cpu_s']:.1f} + {offline['scoring_cpu_s']:.1f} s CPU", flush=True)
            per_seed[seed] = {}
            for name in args.methods:
                r = run_method(name, shared, args, workdir, seed, offline)
                per_seed[seed][name] = r
                second = r["final"]["second_reward"]
                resampled = f", {len(r['rounds'])} re-samples" if r["rounds"] else ""
                print(f"seed {seed} {name}: {r['steps']} steps, reward {r['final']['reward']:.3f} (second reader "
                      + ("n/a" if second is None else f"{second:.3f}") + f"), corrected "
                      f"{r['final']['corrected']:.3f}, {r['time']['total_s']:.1f} s wall, "
                      f"{r['time']['total_cpu_s']:.1f} s CPU{resampled}", flush=True)
                # after every method, so an interrupted run keeps what it measured
                partial = build_report(args, p, data_p, task, shared.base, offline_runs, per_seed, deltas, total, complete=False)
                write_json(out_dir / f"{OUT_NAME}.partial.json", partial)
        del base_model
    report = build_report(args, p, data_p, task, shared.base, offline_runs, per_seed, deltas, total, complete=True)
    write_json(out_dir / f"{OUT_NAME}.json", report)
    (out_dir / f"{OUT_NAME}.partial.json").unlink(missing_ok=True)
    plot(report, out_dir / f"{OUT_NAME}.png")
    print("\n".join(summary_lines(report)))
    cost = report["benchmark_cost"]
    print(f"benchmark itself: {cost['wall_s']:.0f} s wall, {cost['cpu_s']:.0f} s CPU; written to {out_dir / OUT_NAME}.json and .png")
    return report


if __name__ == "__main__":
    main()
