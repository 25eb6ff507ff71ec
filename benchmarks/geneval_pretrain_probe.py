"""How soon does the built-in GenEval base learn each tag? Pretrain it (the library's own ``pretrain``) and, every
``--every`` steps, sample ``--per-tag`` prompts of each compositional tag with the exact detector, and measure
how alike the text encoder's pooled embeddings of two contrasting prompts are (near 1: the encoder ignores the
word that tells them apart). One JSON line per reading; nothing is written to the project.

    OMP_NUM_THREADS=1 python benchmarks/geneval_pretrain_probe.py --params params-geneval.yaml \\
        --set pretrain.steps=2500 --set pretrain.low_quality_share=0 --set pretrain.logit_mean=2.0

docs/experiments/geneval-composition.md ("Why the first bases did not bind") has the table it gave.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from gdro_core.evaluation.heldout import generate
from gdro_core.models.builtin import BuiltinModelAdapter, build_builtin_pipeline
from gdro_core.params import load_params
from gdro_core.tasks.geneval.prompts import all_prompts
from gdro_core.tasks.registry import caption_words, make_task
from gdro_core.training.pretrain import pretrain

TAGS = ("colors", "counting", "position", "color_attr", "two_object")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params-geneval.yaml", help="a task: geneval params file")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="params override, e.g. --set pretrain.logit_mean=2.0 (repeatable)")
    ap.add_argument("--every", type=int, default=500, help="steps between readings (a multiple of pretrain.log_every)")
    ap.add_argument("--per-tag", type=int, default=16, help="prompts read per tag (fewer where the world has fewer)")
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--contrast", nargs=2, default=["a photo of a red square", "a photo of a blue square"],
                    metavar="PROMPT", help="two prompts whose pooled embeddings are compared")
    ap.add_argument("--seed", type=int, default=1, help="which prompts are read")
    args = ap.parse_args(argv)
    for item in args.overrides:
        if "=" not in item:
            ap.error(f"--set {item!r}: expected KEY=VALUE, e.g. pretrain.logit_mean=2.0")
    if args.every <= 0 or args.per_tag <= 0 or args.images_per_prompt <= 0:
        ap.error("--every, --per-tag and --images-per-prompt must be positive")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.overrides)}
    p = load_params(args.params, overrides)
    if p.task != "geneval" or p.model.source != "builtin":
        sys.exit(f"{args.params}: the probe pretrains the built-in model on the GenEval world; set task: geneval "
                 "and model.source: builtin")
    if args.every % p.pretrain.log_every:
        sys.exit(f"--every {args.every} must be a multiple of pretrain.log_every ({p.pretrain.log_every}): the "
                 "probe reads the model when pretraining logs")
    task = make_task(p)
    g = p.geneval
    rng = random.Random(args.seed)
    prompts = {tag: rng.sample(pool, min(args.per_tag, len(pool)))
               for tag in TAGS if (pool := all_prompts(tag, g.classes, g.colors, g.max_count))}
    pipe = build_builtin_pipeline(p.model.builtin, p.image_shape, p.sampler.shift, p.pretrain.seed,
                                  words=caption_words(p))
    readings: list[dict] = []
    start = time.process_time()

    def read(step: int, logged: dict[str, float]) -> None:
        if step % args.every and step != p.pretrain.steps:
            return
        modules = (pipe.transformer, pipe.text_encoder)
        model = BuiltinModelAdapter(pipe, p.image_shape[:2], shift=p.sampler.shift)
        row: dict = {"step": step, "loss": round(logged["pretrain/loss"], 4),
                     "cpu_s": round(time.process_time() - start, 1)}
        with torch.no_grad():
            for tag, records in prompts.items():
                images = generate(model, records, args.images_per_prompt, p.evaluate.seed, p.sampler.steps,
                                  p.sampler.guidance, p.sampler.batch_size)
                scores = task.reward(images, [r for r in records for _ in range(args.images_per_prompt)])
                row[tag] = round(float(scores["correct"].mean()), 3)
            pooled = torch.nn.functional.normalize(model.encode(list(args.contrast))["pooled_projections"], dim=-1)
            row["pooled_cos"] = round(float(pooled[0] @ pooled[1]), 3)
        for module in modules:  # back to training: the adapter froze them for sampling
            module.train().requires_grad_(True)
        readings.append(row)
        print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory() as ckpt:
        pretrain(pipe, p.image_shape[:2], task.pretrain_batch, p.pretrain, Path(ckpt), read)
    return readings


if __name__ == "__main__":
    main()
