"""Stage `base`: pretrain the built-in model on rendered text, or record the real checkpoint to use."""

from __future__ import annotations

import shutil
from typing import Any

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.context import load_layout
from gdro_core.cache_keys import pretrain_fingerprint
from gdro_core.models.builtin import build_builtin_pipeline
from gdro_core.models.families import base_identity
from gdro_core.layout import Layout
from gdro_core.tasks.registry import caption_words, make_task
from gdro_core.training.pretrain import pretrain
from gdro_core.data.store import write_json
from gdro_core.tracking.runs import metric_logger, stage_run, tracking_optional
from gdro_core.training.checkpoint import resuming_from


@task(cache_policy=NO_CACHE)
def pretrain_builtin(lay: Layout) -> None:
    p = lay.params
    logger = get_run_logger()
    pipe = build_builtin_pipeline(p.model.builtin, p.image_shape, p.sampler.shift, p.pretrain.seed,
                                  words=caption_words(p))
    log = metric_logger(logger.info, p.tracking.metric_pause)
    ckpt = lay.checkpoints("base", pretrain_fingerprint(lay))
    if note := resuming_from(ckpt):
        logger.info(note)
    pretrain(pipe, p.image_shape[:2], make_task(p).pretrain_batch, p.pretrain, ckpt, log)
    tmp = lay.base_dir.with_name(".base.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    shutil.rmtree(lay.base_dir, ignore_errors=True)
    tmp.rename(lay.base_dir)


@flow(name="base")
def base_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None) -> str:
    lay = load_layout(params_path, overrides)
    p = lay.params
    with stage_run(p, lay.root, "base"):
        if p.model.source == "builtin":
            pretrain_builtin(lay)
            with tracking_optional("log the base model"):
                mlflow.log_artifacts(str(lay.base_dir), "base")
        else:
            lay.base_dir.mkdir(parents=True, exist_ok=True)
            write_json(lay.base_dir / "source.json", base_identity(p.model.source))
        get_run_logger().info("base model ready at %s", lay.base_dir)
        return str(lay.base_dir)
