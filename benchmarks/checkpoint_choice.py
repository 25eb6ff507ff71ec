"""Which checkpoint each rule keeps, against what the held-out prompts say of every checkpoint.

For each ``--seeds`` train seed, trains the post-training step on the project's rollouts and reward table
(``--steps``, default ``train.steps``) and scores the EMA adapter at every ``evaluate.checkpoint_every`` steps,
image by image, on ``--val-prompts`` validation prompts (one image each, the checkpoint monitor's seeds; the
first ``prompts.n_val`` of them are the project's own) and on the held-out prompts (evaluate's images and seeds).
Then, for each validation size in ``--val-sizes`` (the first N validation prompts) and each rule, prints the step
the rule keeps and that step's held-out reward gain over the base:

- ``corrected``: the best corrected score (``evaluate.tie_se: 0``);
- ``tie``: near-ties (within ``--tie-se`` paired standard errors) settled by the reward (``evaluate.tie_se``);
- ``reward``: the best reward (no guard against hacking);
- ``last``: the last checkpoint (``evaluate.keep: last``).

Writes ``reports/benchmark/checkpoint_choice.csv`` (every image's scores) and ``checkpoint_choice.json`` (the
table). Run after ``dvc repro score``::

    python benchmarks/checkpoint_choice.py --seeds 0 1 2 --steps 600
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd
import torch

from gdro_core.data.pool import open_rollouts
from gdro_core.data.scoring import read_table, reward_matrix
from gdro_core.data.store import write_json
from gdro_core.evaluation.curves import best_step
from gdro_core.evaluation.heldout import assess, generate
from gdro_core.evaluation.judge import make_task_judge
from gdro_core.layout import Layout
from gdro_core.models import load_model
from gdro_core.models.lora import lora_state, set_lora_state
from gdro_core.models.offload import PreEncoded
from gdro_core.params import load_params
from gdro_core.tasks.registry import make_task
from gdro_core.training.loop import train

OUT_NAME = "checkpoint_choice"
RULES = ("corrected", "tie", "reward", "last")


def keep(scores: pd.DataFrame, rule: str, tie_se: float) -> int:
    """The step ``rule`` keeps from validation scores (columns step, image, reward, corrected)."""
    curve = scores.groupby("step", as_index=False)[["reward", "corrected"]].mean()
    if rule == "reward":
        trained = curve[curve["step"] > 0]
        return int(trained.loc[trained["reward"][::-1].idxmax(), "step"])
    if rule == "last":
        return best_step(curve, "last")
    return best_step(curve, "best_corrected", scores, tie_se if rule == "tie" else 0.0)


def score_checkpoints(lay: Layout, seed: int, steps: int, val_prompts: int) -> pd.DataFrame:
    """Train with ``seed`` for ``steps`` and score every checkpoint on the validation and held-out prompts."""
    p = load_params(lay.root / "params.yaml", {"train.seed": seed, "train.steps": steps, "prompts.n_val": val_prompts})
    task = make_task(p)
    val = task.make_prompt_sets(lay.root)["val"]
    test = task.read_prompts(lay.prompts("test"))
    judge = make_task_judge(task, p.judge)
    data = open_rollouts(lay.rollout_dir)
    rewards = reward_matrix(read_table(lay.rewards, data.fingerprint), *data.shape)
    model = load_model(p, lay.base_dir)
    view = PreEncoded(model, [q.prompt for q in val + test], p.sampler.batch_size)
    tables = []

    def measure(step: int) -> None:
        for split, prompts, per in (("val", val, 1), ("test", test, p.evaluate.images_per_prompt)):
            images = generate(view, prompts, per, p.evaluate.seed, p.sampler.steps, p.sampler.guidance,
                              p.sampler.batch_size)
            s = assess(images, [q for q in prompts for _ in range(per)], task, judge, p.judge_task)
            tables.append(s[["reward", "corrected"]].assign(seed=seed, step=step, split=split, image=range(len(s))))
        last = pd.concat(tables[-2:])
        print(f"seed {seed} step {step}:", last.groupby("split")["reward"].mean().round(3).to_dict(), flush=True)

    def on_checkpoint(step: int, weights: dict[str, torch.Tensor]) -> None:
        live = {k: v.detach().clone() for k, v in lora_state(model.transformer).items()}
        set_lora_state(model.transformer, weights)
        model.transformer.eval()
        with torch.no_grad():
            measure(step)
        set_lora_state(model.transformer, live)
        model.transformer.train()

    with torch.no_grad():
        measure(0)
    with tempfile.TemporaryDirectory() as ckpt:
        train(model, data, rewards, p.train, Path(ckpt), lambda step, metrics: None, on_checkpoint=on_checkpoint,
              eval_every=p.evaluate.checkpoint_every or steps)
    return pd.concat(tables, ignore_index=True)


def choices(scores: pd.DataFrame, sizes: list[int], tie_se: float) -> list[dict]:
    """For each seed, validation size and rule: the step kept and its held-out gain over the base."""
    rows = []
    for seed, run in scores.groupby("seed"):
        test = run[run["split"] == "test"].groupby("step")["reward"].mean()
        val = run[run["split"] == "val"]
        for n in sizes:
            for rule in RULES:
                step = keep(val[val["image"] < n], rule, tie_se)
                rows.append({"seed": int(seed), "val_prompts": n, "rule": rule, "step": step,
                             "heldout_gain": float(test[step] - test[0])})
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=".")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=0, help="train steps (0 = train.steps)")
    ap.add_argument("--val-prompts", type=int, default=128)
    ap.add_argument("--val-sizes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--tie-se", type=float, default=1.0)
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    lay = Layout(root=root, params=load_params(root / "params.yaml"))
    sizes = sorted(n for n in args.val_sizes if n <= args.val_prompts)
    if not sizes:
        raise SystemExit(f"--val-sizes {args.val_sizes} are all above --val-prompts {args.val_prompts}")
    steps = args.steps or lay.params.train.steps
    scores = pd.concat([score_checkpoints(lay, s, steps, args.val_prompts) for s in args.seeds], ignore_index=True)
    out = lay.reports_dir / "benchmark"
    out.mkdir(parents=True, exist_ok=True)
    scores.to_csv(out / f"{OUT_NAME}.csv", index=False)
    rows = choices(scores, sizes, args.tie_se)
    table = pd.DataFrame(rows)
    wide = table.assign(kept=[f"{g:+.3f} @{s}" for g, s in zip(table["heldout_gain"], table["step"])]).pivot(
        index=["val_prompts", "rule"], columns="seed", values="kept")
    gains = scores[scores["split"] == "test"].groupby(["seed", "step"])["reward"].mean().unstack("step")
    print("held-out reward gain over the base, by seed and step:")
    print(gains.sub(gains[0], axis=0).drop(columns=0).round(3).to_string())
    print(f"\nkept step and its held-out gain (tie: {args.tie_se} paired standard errors):")
    print(wide.to_string())
    report = {"steps": steps, "tie_se": args.tie_se, "val_prompts": args.val_prompts, "choices": rows}
    write_json(out / f"{OUT_NAME}.json", report)
    return report


if __name__ == "__main__":
    main()
