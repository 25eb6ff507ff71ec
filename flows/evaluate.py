"""Stage `evaluate`: held-out reward of base and trained model, sample grid, metrics, registry.

A later round (``--round N``) evaluates its adapter on the same held-out prompts and seeds as round 1, so
``reports/rounds/<N>/metrics.json`` compares directly with ``reports/metrics.json``."""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.context import load_layout
from gdro_core.evaluation.heldout import assess, generate, sample_grid
from gdro_core.evaluation.judge import make_task_judge
from gdro_core.models import load_model
from gdro_core.layout import Layout
from gdro_core.params import check_train_eval_seeds
from gdro_core.tasks.registry import make_task
from gdro_core.tracking.compare import set_champion
from gdro_core.tracking.data_version import data_version
from gdro_core.tracking.registry import register_adapter
from gdro_core.data.store import atomic_write, write_json
from gdro_core.tracking.runs import stage_run, tracking_optional


@task(cache_policy=NO_CACHE)
def score_models(lay: Layout) -> dict:
    p = lay.params
    logger = get_run_logger()
    task = make_task(p)
    per = p.evaluate.images_per_prompt
    prompts = task.read_prompts(lay.prompts("test"))
    records = [q for q in prompts for _ in range(per)]
    targets = [q.target for q in records]
    judge = make_task_judge(task, p.judge)
    model = load_model(p, lay.base_dir)
    train_prompts = []
    if p.evaluate.train_prompts:
        train_prompts = task.read_prompts(lay.prompts("train"))[: p.evaluate.train_prompts]
        check_train_eval_seeds(p, len(train_prompts), lay.round)

    def sample_on(chosen, seed):
        return generate(model, chosen, per, seed, p.sampler.steps, p.sampler.guidance, p.sampler.batch_size)

    images, metrics, tables = {}, {}, []
    for name in ("base", "trained"):
        if name == "trained":
            model.load_adapter(lay.adapter_dir)
        images[name] = sample_on(prompts, p.evaluate.seed)
        scores = assess(images[name], records, task, judge, p.judge.task)
        metrics[name] = task.summarise(scores)
        tables.append(scores.assign(model=name, target=targets))
        logger.info("%s: %s", name, metrics[name])
        if train_prompts:  # the same model on its own training prompts, with noise no rollout drew
            seen = task.reward(sample_on(train_prompts, p.evaluate.train_seed),
                               [q for q in train_prompts for _ in range(per)])
            metrics[f"{name}_train"] = task.summarise(seen)
            logger.info("%s on training prompts: %s", name, metrics[f"{name}_train"])
    metrics["ceiling"] = task.ceiling(prompts)
    metrics["delta"] = {k: metrics["trained"][k] - metrics["base"][k] for k in ("reward", "corrected", "geneval")
                        if k in metrics["base"]}
    if train_prompts:
        metrics["delta_train"] = {k: metrics["trained_train"][k] - metrics["base_train"][k]
                                  for k in ("reward", "geneval") if k in metrics["base_train"]}
    n = min(p.evaluate.grid_prompts, len(prompts))
    grid = sample_grid({k: v[::per][:n] for k, v in images.items()}, [getattr(q, "caption", q.target) for q in prompts[:n]])
    return {"metrics": metrics, "grid": grid, "scores": pd.concat(tables, ignore_index=True)}


@flow(name="evaluate")
def evaluate_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None, round: int = 1) -> dict:
    lay = load_layout(params_path, overrides, round)
    p = lay.params
    with stage_run(p, lay.root, "evaluate", round=round):
        out = score_models(lay)
        metrics = out["metrics"]
        write_json(lay.metrics, metrics)
        atomic_write(lay.reports_dir / "samples.png", lambda f: out["grid"].save(f, format="PNG"))
        atomic_write(lay.reports_dir / "eval_scores.csv", lambda f: out["scores"].to_csv(f, index=False))
        with tracking_optional("log the metrics and register the adapter"):  # metrics.json is written already
            mlflow.log_metrics({f"{k}.{m}": v for k, d in metrics.items() for m, v in d.items()})
            mlflow.log_artifact(str(lay.reports_dir / "samples.png"))
            version = register_adapter(p, lay.adapter_dir, lay.base_dir, metrics, data_version(lay), round=round)
            if version is not None:
                best, metric = set_champion(mlflow.MlflowClient(), version.name, p.registry.rank_by, p.registry.alias)
                get_run_logger().info("registered %s version %s; %s is version %s (by %s)",
                                      version.name, version.version, p.registry.alias, best, metric)
        get_run_logger().info("metrics: %s", metrics)
        return metrics
