"""Stage `train`: GDRO (or a baseline objective) on the cached groups, LoRA through peft.

Checkpoints are evaluated on held-out prompts as training goes (reward, judge, corrected score);
the adapter kept is the best corrected score unless ``evaluate.keep`` says ``last``. A later round
(``--round N``) trains round N-1's adapter further on round N's rollouts; the reference stays the base.
"""

from __future__ import annotations

from typing import Any

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.context import load_layout
from gdro_core.models import load_model
from gdro_core.models.family import BASE_FILE
from gdro_core.params import ONLINE_OBJECTIVES, reading_params
from gdro_core.evaluation.judge import make_task_judge
from gdro_core.layout import Layout
from gdro_core.tasks.registry import make_task
from gdro_core.evaluation.monitor import CheckpointMonitor
from gdro_core.training.online_grpo import encode_prompts, task_reward, train_online
from gdro_core.data.pool import open_rollouts
from gdro_core.models.offload import PreEncoded, offload_unused
from gdro_core.training.checkpoint import resuming_from
from gdro_core.training.launch import launched
from gdro_core.data.scoring import read_table, reward_matrix
from gdro_core.data.store import read_json
from gdro_core.cache_keys import train_fingerprint
from gdro_core.tracking.runs import metric_logger, stage_run, tracking_optional
from gdro_core.training.kept_adapter import keep_adapter
from gdro_core.training.loop import train


def init_adapter(lay: Layout):
    """The adapter training starts from: none in round 1, round N-1's in round N."""
    return lay.previous_adapter() if lay.round > 1 else None


def _offline_inputs(lay: Layout):
    """The lazily read rollout pool, its reward table and the base model (shared by every process)."""
    p = lay.params
    data = open_rollouts(lay.rollout_dir)
    rewards = reward_matrix(read_table(lay.rewards, data.fingerprint), *data.shape)
    model = load_model(p, lay.base_dir)
    return data, rewards, model


@task(cache_policy=NO_CACHE)
def fit_adapter(lay: Layout) -> dict:
    p = lay.params
    if p.train.num_processes > 1 and not launched():
        raise ValueError(
            f"train.num_processes is {p.train.num_processes}: run `gdro train` (it starts torchrun) or "
            "`accelerate launch --multi_gpu --num_processes N -m flows.cli train`; the pipeline and sweep flows train in one process"
        )
    online = p.train.objective in ONLINE_OBJECTIVES
    if lay.round > 1 and online:
        raise ValueError(f"train.objective {p.train.objective} samples its own images online: later rounds (--round) "
                         "are for the offline objectives; run them without --round")
    logger = get_run_logger()
    log = metric_logger(logger.info, p.tracking.metric_pause)
    data, rewards, model = _offline_inputs(lay)
    ckpt = lay.checkpoints("train", train_fingerprint(lay))
    if note := resuming_from(ckpt):
        logger.info(note)
    task = make_task(p)  # scores the online methods' own samples, as the score stage scores the stored groups
    reading = make_task(reading_params(p))  # reads the validation images, as evaluate reads the held-out ones
    val = task.read_prompts(lay.prompts("val"))[: p.evaluate.checkpoint_prompts]
    # offline: the monitor's prompts are encoded now, so the encoders and VAE can leave the device
    monitored = model if online else PreEncoded(model, [q.prompt for q in val], p.sampler.batch_size)
    monitor = CheckpointMonitor(
        monitored, val, reading, make_task_judge(reading, p.judge), judge_task=p.judge_task, seed=p.evaluate.seed,
        steps=p.sampler.steps, guidance=p.sampler.guidance, batch_size=p.sampler.batch_size, keep=p.evaluate.keep,
        workdir=ckpt / "monitor", log=log, per_prompt=p.evaluate.checkpoint_images_per_prompt,
        tie_se=p.evaluate.tie_se,
    )
    monitor.evaluate_base()
    every = p.evaluate.checkpoint_every or p.train.steps
    if online:  # the online baselines: fresh rollouts every iteration
        prompts = task.read_prompts(lay.prompts("train"))
        reward = task_reward(task, prompts)
        train_online(model, prompts, *encode_prompts(model, prompts, p.sampler.batch_size), reward, p.train, ckpt, log,
                     on_checkpoint=monitor, eval_every=every, guidance=p.sampler.guidance)
    else:
        offload_unused(model)
        train(model, data, rewards, p.train, ckpt, log, on_checkpoint=monitor, eval_every=every,
              init_adapter=init_adapter(lay))
    return keep_adapter(
        model, monitor, lay.adapter_dir, lay.reports_dir, p.evaluate.hacking_window,
        f"{p.train.objective}, beta={p.train.beta}",
    )


def train_worker(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None, round: int = 1) -> None:
    """A non-main process of a data-parallel `gdro train`: trains its share, and writes, evaluates and reports nothing."""
    lay = load_layout(params_path, overrides, round)
    p = lay.params
    data, rewards, model = _offline_inputs(lay)
    offload_unused(model)
    train(model, data, rewards, p.train, lay.checkpoints("train", train_fingerprint(lay)), lambda step, metrics: None,
          eval_every=p.evaluate.checkpoint_every or p.train.steps, init_adapter=init_adapter(lay))


@flow(name="train")
def train_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None, round: int = 1) -> str:
    lay = load_layout(params_path, overrides, round)
    try:  # an interrupted training continues its own MLflow run, keyed like its checkpoints
        key = lay.checkpoints("train", train_fingerprint(lay)).name
    except FileNotFoundError:
        key = ""  # no rollouts or rewards yet: fit_adapter says what to run first
    with stage_run(lay.params, lay.root, "train", resume_key=key,
                   round=round):
        summary = fit_adapter(lay)
        with tracking_optional("log the summary and the adapter"):  # the adapter is saved: tracking cannot lose it
            mlflow.set_tag("data.base_fingerprint", read_json(lay.adapter_dir / BASE_FILE)["fingerprint"])
            mlflow.log_metrics({k: float(v) for k, v in summary.items()})
            mlflow.log_artifacts(str(lay.adapter_dir), "adapter")
            for name in ("train_curves.png", "train_curve.csv"):
                if (lay.reports_dir / name).is_file():
                    mlflow.log_artifact(str(lay.reports_dir / name))
        if summary.get("hacking_trend"):
            get_run_logger().warning("reward rises while the corrected score falls: possible reward hacking")
        get_run_logger().info("adapter (step %s) saved to %s", summary["kept_step"], lay.adapter_dir)
        return str(lay.adapter_dir)
