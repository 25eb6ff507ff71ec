"""How far can training on the training prompts move the built-in GenEval base, given perfect images?

Every reward method (GDRO, filtering, online RL) can at best teach the policy to draw its training prompts right.
This probe skips the reward: it fine-tunes the pipeline's base by flow matching on the world's own correct scenes
of the training prompts (``--prompts train``; ``all`` adds the held-out prompts, a capacity check), through the
default LoRA, a wider LoRA (feed-forward and adaptive-norm layers too) or the whole transformer, and reads the
held-out and training prompts with the exact detector every ``--every`` steps. One JSON line per reading; nothing
is written to the project. Run it after ``gdro prompts`` and ``gdro base`` (or the pipeline):

    OMP_NUM_THREADS=1 python benchmarks/geneval_oracle_ceiling.py --params params-geneval.yaml --adapter lora

docs/experiments/geneval-composition.md ("The ceiling") has the table it gave.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from gdro_core.data.pool import open_rollouts
from gdro_core.data.scoring import read_table, reward_matrix
from gdro_core.evaluation.heldout import generate
from gdro_core.layout import Layout
from gdro_core.models import load_model
from gdro_core.models.base import velocity
from gdro_core.models.families import add_lora
from gdro_core.models.lora import attach_lora
from gdro_core.models.sd3 import SD3_TARGETS
from gdro_core.objectives.implicit_reward import interpolate
from gdro_core.objectives.timesteps import sample_timesteps
from gdro_core.params import load_params
from gdro_core.tasks.geneval.reward import summarise
from gdro_core.tasks.geneval.world import to_array
from gdro_core.tasks.registry import make_task

WIDE_TARGETS = (*SD3_TARGETS, "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                "norm1.linear", "norm1_context.linear")
"""The default LoRA's attention projections plus every block's feed-forward and adaptive-norm projections."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path("."), help="project root (holds the params file and outputs)")
    ap.add_argument("--params", type=Path, default=Path("params-geneval.yaml"),
                    help="a task: geneval params file, relative to --root")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="params override, e.g. --set train.lr=0.001 (repeatable)")
    ap.add_argument("--adapter", choices=("lora", "wide", "full"), default="lora",
                    help="lora: train.lora as configured; wide: rank train.lora.rank on attention, feed-forward "
                         "and adaptive norms; full: every transformer weight")
    ap.add_argument("--prompts", choices=("train", "all"), default="train",
                    help="whose correct scenes are trained on: the training prompts, or training and held-out")
    ap.add_argument("--renders-per-prompt", type=int, default=0,
                    help="0: a fresh correct scene every draw; K: a fixed pool of K scenes per prompt, drawn once "
                         "(K 1 is what best-of-N filtering trains on: one right image per prompt)")
    ap.add_argument("--scenes", choices=("world", "rollouts"), default="world",
                    help="world: the world's correct scenes; rollouts: each training prompt's best stored rollout "
                         "(by the reward table), what best-of-N filtering trains on (needs --renders-per-prompt 1)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32, help="scenes per step")
    ap.add_argument("--lr", type=float, default=None, help="default: train.lr (full: a tenth of it)")
    ap.add_argument("--every", type=int, default=250, help="steps between readings")
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for item in args.overrides:
        if "=" not in item:
            ap.error(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=0.001")
    if min(args.steps, args.batch, args.every, args.images_per_prompt) <= 0 or args.renders_per_prompt < 0:
        ap.error("--steps, --batch, --every and --images-per-prompt must be positive, --renders-per-prompt >= 0")
    if args.scenes == "rollouts" and (args.renders_per_prompt != 1 or args.prompts != "train"):
        ap.error("--scenes rollouts trains on one stored image per training prompt: use --renders-per-prompt 1 "
                 "and --prompts train")
    return args


def trainable(model, adapter: str, lora_cfg) -> list[torch.nn.Parameter]:
    """The parameters the probe trains: a fresh LoRA (B = 0, so step 0 is the base) or the whole transformer."""
    if adapter == "full":
        model.transformer.requires_grad_(True)
        return list(model.transformer.parameters())
    if adapter == "wide":
        return attach_lora(model.transformer, lora_cfg, list(WIDE_TARGETS))
    return add_lora(model.transformer, lora_cfg)  # train.lora's targets, or the family's default


def best_rollouts(layout: Layout) -> dict[str, list[np.ndarray]]:
    """Each stored prompt's best rollout by the reward table (first of ties), as a one-image pool."""
    data = open_rollouts(layout.rollout_dir)
    rewards = reward_matrix(read_table(layout.rewards, data.fingerprint), *data.shape)
    best = rewards.argmax(dim=1)
    x0, _ = data.take(torch.arange(data.shape[0]), best[:, None])
    prompts = {row["prompt_index"]: row["prompt"] for row in data.rows}
    return {prompts[i]: [x0[i, 0].float().numpy()] for i in range(data.shape[0])}


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.overrides)}
    p = load_params(args.root / args.params, overrides)
    if p.task != "geneval" or p.model.source != "builtin":
        sys.exit(f"{args.params}: the probe trains the built-in model on the GenEval world's scenes; set task: "
                 "geneval and model.source: builtin")
    layout = Layout(args.root.resolve(), p)
    if not (layout.base_dir.is_dir() and layout.prompts("train").is_file()):
        sys.exit(f"no base at {layout.base_dir} or no prompts at {layout.prompts_dir}: run `gdro prompts` and "
                 f"`gdro base --params {args.params}` in {args.root} first")
    task = make_task(p)
    splits = {s: task.read_prompts(layout.prompts(s)) for s in ("train", "test")}
    pool = splits["train"] + (splits["test"] if args.prompts == "all" else [])
    model = load_model(p, layout.base_dir, device="cpu")
    params = trainable(model, args.adapter, p.train.lora)
    lr = args.lr if args.lr is not None else p.train.lr / (10 if args.adapter == "full" else 1)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen, rng = torch.Generator().manual_seed(args.seed), random.Random(args.seed)
    if args.scenes == "rollouts":
        fixed = best_rollouts(layout)
        pool = [r for r in pool if r.prompt in fixed]
    else:
        fixed = {r.prompt: [to_array([task.render(r, rng)])[0] for _ in range(args.renders_per_prompt)]
                 for r in pool}

    def scene(record) -> np.ndarray:
        if args.renders_per_prompt:
            return rng.choice(fixed[record.prompt])
        return to_array([task.render(record, rng)])[0]

    readings: list[dict] = []
    start = time.process_time()

    def read(step: int) -> None:
        model.transformer.eval()
        row: dict = {"adapter": args.adapter, "prompts": args.prompts, "scenes": args.scenes,
                     "renders": args.renders_per_prompt,
                     "lr": lr, "step": step,
                     "trainable": sum(x.numel() for x in params), "cpu_s": round(time.process_time() - start, 1)}
        with torch.no_grad():
            for split, records in splits.items():
                images = generate(model, records, args.images_per_prompt, p.evaluate.seed, p.sampler.steps,
                                  p.sampler.guidance, p.sampler.batch_size)
                scores = task.reward(images, [r for r in records for _ in range(args.images_per_prompt)])
                summary = summarise(scores)
                prefix = "" if split == "test" else "train_"
                row |= {f"{prefix}{k}": round(v, 3) for k, v in summary.items()
                        if k in ("geneval", "compositional", "score") or k.startswith("tag.")}
        model.transformer.train()
        readings.append(row)
        print(json.dumps(row), flush=True)

    read(0)
    model.transformer.train()
    for step in range(1, args.steps + 1):
        records = [rng.choice(pool) for _ in range(args.batch)]
        x0 = torch.from_numpy(np.stack([scene(r) for r in records]))
        noise = torch.randn(x0.shape, generator=gen)
        t = sample_timesteps(len(records), p.train.timestep_sampling, p.train.logit_mean, p.train.logit_std, gen)
        x_t, v = interpolate(x0, noise, t)
        with torch.no_grad():
            cond = model.encode([r.prompt for r in records])
        loss = F.mse_loss(velocity(model, x_t, t, cond).float(), v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, p.train.grad_clip)
        opt.step()
        if step % args.every == 0 or step == args.steps:
            read(step)
    return readings


if __name__ == "__main__":
    main()
