"""Stage `evaluate`: held-out reward of base and trained model, sample grid, metrics, registry.

metrics.json's ``judge`` section (and the run's tags) name the judge behind the corrected score.

A later round (``--round N``) evaluates its adapter on the same held-out prompts and seeds as round 1, so
``reports/rounds/<N>/metrics.json`` compares directly with ``reports/metrics.json``."""

from __future__ import annotations

from typing import Any

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.context import load_layout
from gdro_core.evaluation.base_vs_trained import evaluate_models, flat_metrics
from gdro_core.evaluation.image_folders import write_prompt_folders
from gdro_core.evaluation.judge import corrected_score_judge, make_task_judge
from gdro_core.models import load_model
from gdro_core.layout import Layout
from gdro_core.params import check_train_eval_seeds, reading_params
from gdro_core.stages import HELDOUT_IMAGES
from gdro_core.tasks.registry import make_task
from gdro_core.tracking.compare import set_champion
from gdro_core.tracking.data_version import data_version
from gdro_core.tracking.registry import register_adapter
from gdro_core.data.store import atomic_write, write_json
from gdro_core.tracking.runs import stage_run, tracking_optional


@task(cache_policy=NO_CACHE)
def score_models(lay: Layout) -> dict:
    p = lay.params
    task = make_task(reading_params(p))
    train_prompts = []
    if p.evaluate.train_prompts:
        train_prompts = task.read_prompts(lay.prompts("train"))[: p.evaluate.train_prompts]
        check_train_eval_seeds(p, len(train_prompts), lay.round)
    e, s = p.evaluate, p.sampler
    return evaluate_models(
        load_model(p, lay.base_dir), lay.adapter_dir, task, make_task_judge(task, p.judge), p.judge_task,
        task.read_prompts(lay.prompts("test")), train_prompts, e.images_per_prompt, e.seed, e.train_seed, s.steps,
        s.guidance, s.batch_size, e.grid_prompts, with_ceiling=p.model.source == "builtin",
        log=get_run_logger().info, bootstrap_samples=e.bootstrap_samples, ci_level=e.ci_level,
    )


@flow(name="evaluate")
def evaluate_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None, round: int = 1) -> dict:
    lay = load_layout(params_path, overrides, round)
    p = lay.params
    with stage_run(p, lay.root, "evaluate", round=round):
        out = score_models(lay)
        judge = corrected_score_judge(p)  # which judge the corrected score rests on, beside the numbers
        metrics = {**out["metrics"], "judge": judge}
        if "corrected_score_note" in judge:
            get_run_logger().warning("corrected score from the pixel judge: %s", judge["corrected_score_note"])
        write_json(lay.metrics, metrics)
        atomic_write(lay.reports_dir / "samples.png", lambda f: out["grid"].save(f, format="PNG"))
        atomic_write(lay.reports_dir / "eval_scores.csv", lambda f: out["scores"].to_csv(f, index=False))
        if p.evaluate.save_images:
            prompts = make_task(p).read_prompts(lay.prompts("test"))
            for name, images in out["images"].items():
                write_prompt_folders(lay.reports_dir / HELDOUT_IMAGES / name, images, prompts,
                                     p.evaluate.images_per_prompt)
        with tracking_optional("log the metrics and register the adapter"):  # metrics.json is written already
            mlflow.log_metrics(flat_metrics(metrics))
            mlflow.set_tags(judge)
            mlflow.log_artifact(str(lay.reports_dir / "samples.png"))
            version = register_adapter(p, lay.adapter_dir, lay.base_dir, metrics, data_version(lay), round=round)
            if version is not None:
                best, metric = set_champion(mlflow.MlflowClient(), version.name, p.registry.rank_by, p.registry.alias)
                get_run_logger().info("registered %s version %s; %s is version %s (by %s)",
                                      version.name, version.version, p.registry.alias, best, metric)
        get_run_logger().info("metrics: %s", metrics)
        return metrics
