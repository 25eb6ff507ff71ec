"""Typed, validated ``params.yaml``: the single source of truth for every knob.

Each section is a pydantic model that forbids unknown keys, so a typo such as ``train.betta``
is an error naming the key, never a silent default.
"""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ParamsError(ValueError):
    """A params file that cannot be used; the message names the key and the fix."""


def numbers_only(annotation: Any) -> bool:
    """An int or float field (or an optional one): YAML's ``yes``/``true`` is never one of its values."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = [a for a in (typing.get_args(annotation) if union else (annotation,)) if a is not type(None)]
    return bool(kinds) and all(k in (int, float) for k in kinds)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def no_yes_no_for_numbers(cls, value: Any, info) -> Any:
        """pydantic takes ``true`` as 1 for a number: ``train.steps: yes`` would train one step."""
        if isinstance(value, bool) and numbers_only(cls.model_fields[info.field_name].annotation):
            raise ValueError("a yes/no value is not a number")
        return value


class Paths(Section):
    data_dir: str = Field("data", description="Prompt sets, rollouts and reward tables (DVC outputs).")
    models_dir: str = Field("models", description="Base model (DVC output).")
    adapter_dir: str = Field("models/adapter", description="Trained adapter (DVC output); sweeps give each config its own.")
    reports_dir: str = Field("reports", description="Metrics, plots and sample grids.")


class Tracking(Section):
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI; relative sqlite paths are inside the project.")
    artifact_location: str = Field("mlartifacts", description="Artifact root for a new experiment.")
    experiment: str = Field("gdro", description="MLflow experiment name.")
    registered_model: str = Field("gdro-ocr-lora", description="Registry name of trained adapters.")
    connect_timeout: float = Field(
        10.0, gt=0, description="Seconds a remote tracking server has to answer its health check at stage start."
    )
    request_timeout: float = Field(
        20.0, gt=0, description="Seconds one MLflow request may take before it is given up (remote servers)."
    )
    request_retries: int = Field(
        1, ge=0, description="Retries of a failed MLflow request; a failed metric log is counted, never fatal."
    )
    metric_pause: float = Field(
        60.0, ge=0, description="Seconds metric logging pauses (metrics counted and skipped) after a failed log."
    )


class World(Section):
    """The built-in text-rendering world that the default model learns and is scored in."""

    alphabet: str = Field("0123456789", description="Characters a target string is drawn from.")
    min_len: int = Field(3, ge=1, description="Shortest target string.")
    max_len: int = Field(3, ge=1, description="Longest target string.")
    height: int = Field(24, ge=8, description="Image height in pixels.")
    width: int = Field(48, ge=8, description="Image width in pixels.")
    font_size: int = Field(17, ge=4, description="Font size in pixels of rendered text.")
    jitter: int = Field(1, ge=0, description="Random text offset in pixels (render diversity).")

    @model_validator(mode="after")
    def _lengths(self) -> World:
        if self.max_len < self.min_len:
            raise ValueError(f"max_len ({self.max_len}) must be >= min_len ({self.min_len})")
        if len(set(self.alphabet)) != len(self.alphabet) or not self.alphabet:
            raise ValueError("alphabet must be non-empty with no repeated characters")
        return self


PROMPT_FILES = "prompt_files"
"""The directory of user prompt sets; a DVC dependency of the prompts stage."""


class Prompts(Section):
    n_train: int = Field(
        128, ge=1, description="Training prompts; more strings with fewer images each generalise better to unseen ones."
    )
    n_test: int = Field(64, ge=1, description="Held-out prompts; their targets never occur in train.")
    n_val: int = Field(
        32, ge=1, description="Validation prompts for checkpoint selection during train, disjoint from train and test."
    )
    seed: int = 0
    source: str = Field(
        "", description="'' generates the sets from the world; else a directory under prompt_files/ holding "
        "train.txt and test.txt (and val.txt) in Flow-GRPO's format: one prompt per line, target in double quotes.",
    )
    templates: list[str] = Field(
        default_factory=lambda: [
            '"{text}" on a sign',
            '"{text}" written on a wall',
            '"{text}" on a poster',
            '"{text}" as a label',
        ],
        description="Prompt templates; each must contain a quoted {text} placeholder.",
    )

    @model_validator(mode="after")
    def _templates(self) -> Prompts:
        for t in self.templates:
            if '"{text}"' not in t:
                raise ValueError(f"template {t!r} must contain the quoted placeholder \"{{text}}\"")
        return self

    @field_validator("source")
    @classmethod
    def _tracked_source(cls, source: str) -> str:
        parts = PurePosixPath(source.replace("\\", "/")).parts
        if source and (len(parts) < 2 or parts[0] != PROMPT_FILES or ".." in parts):
            raise ValueError(
                f"must be a directory under {PROMPT_FILES}/ (e.g. {PROMPT_FILES}/ocr), the prompt files DVC tracks: "
                "copy your train.txt and test.txt there"
            )
        return source


class BuiltinModel(Section):
    layers: int = Field(4, ge=1, description="SD3 transformer blocks.")
    heads: int = Field(4, ge=1)
    head_dim: int = Field(32, ge=8)
    patch_size: int = Field(4, ge=1)
    text_dim: int = Field(128, ge=8, description="Width of the tiny CLIP text encoder.")
    text_layers: int = Field(2, ge=1)
    max_tokens: int = Field(32, ge=8, description="Tokenizer max length.")
    tokenizer: Literal["char", "word"] = Field(
        "char", description="char: one token per character; word: the task's caption words one token each.")


class Model(Section):
    source: str = Field(
        "builtin",
        description="'builtin' (pretrained here by the base stage) or a local diffusers checkpoint directory / hub id.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", description="'auto' picks CUDA when present (via accelerate), else CPU.")
    builtin: BuiltinModel = BuiltinModel()


class Pretrain(Section):
    steps: int = Field(
        1100, ge=0, description="Short on purpose: the base has not finished learning which glyph each character gets."
    )
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    lr_schedule: Literal["constant", "constant_with_warmup", "cosine", "linear"] = Field(
        "constant", description="diffusers learning-rate schedule; cosine anneals to 0 by the last step."
    )
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    cond_dropout: float = Field(0.1, ge=0, le=1, description="Share of captions replaced by '' (enables CFG).")
    timestep_sampling: Literal["logit_normal", "uniform"] = Field(
        "logit_normal", description="Training timesteps: SD3's logit-normal (most steps near t = 0.5) or uniform "
        "(as many at high noise, where a scene's layout, counts and colours are decided).",
    )
    logit_mean: float = Field(0.0, description="logit_normal: mean of logit(t); > 0 shifts steps towards noise.")
    logit_std: float = Field(1.0, gt=0, description="logit_normal: spread of logit(t).")
    caption_noise: float = Field(
        0.0, ge=0, le=1, description="Share of mislabelled captions (another random string): the base sometimes ignores its prompt."
    )
    attribute_errors: float = Field(
        0.0, ge=0, le=1,
        description="GenEval world: share of scenes whose caption misstates one attribute (another colour, colours "
        "swapped, one object more or fewer, the relation reversed), as web captions do: the base binds badly.",
    )
    low_quality_share: float = Field(
        0.0, ge=0, le=1,
        description="Share of training images degraded by blur, as web data holds low-quality images (imperfect base).",
    )
    low_quality_blur: float = Field(2.0, ge=0, description="Gaussian blur sigma, in pixels, of the low-quality images.")
    checkpoint_every: int = Field(250, ge=1)
    log_every: int = Field(25, ge=1)
    seed: int = 0


class Sampler(Section):
    steps: int = Field(20, ge=1, description="Euler ODE steps (FlowMatchEulerDiscreteScheduler).")
    guidance: float = Field(1.0, ge=0, description="Classifier-free guidance scale; <= 1 disables CFG.")
    shift: float | None = Field(
        None, gt=0,
        description="Timestep shift; null = the checkpoint's own (its scheduler's shift, FLUX.1-dev's dynamic shift, "
        "1 for the built-in model); a number replaces it with that static shift.",
    )
    batch_size: int = Field(64, ge=1)


class Rollout(Section):
    images_per_prompt: int = Field(8, ge=2, description="Pool size N per training prompt (paper: 16).")
    seed: int = 1000
    steps: int | None = Field(
        None, ge=1, description="Sampler steps of the rollouts; null = sampler.steps. GDRO learns from any sampler's "
        "images, so fewer steps here cut the data cost; held-out evaluation keeps sampler.steps.",
    )


class Rounds(Section):
    """Iterated offline rounds (``rounds/dvc.yaml``, ``--round N``): round r >= 2 rolls out from round r-1's
    adapter, scores those images and trains the same LoRA further; the reference stays the base."""

    seed_offset: int = Field(
        1_000_000, ge=1,
        description="Round r's rollouts use seeds from rollout.seed + (r - 1) * seed_offset, so every round draws new "
        "noise; must be at least the number of images one round samples.",
    )
    images_per_prompt: int | None = Field(
        None, ge=2, description="Pool size N of rounds >= 2; null = rollout.images_per_prompt."
    )
    steps: int | None = Field(None, ge=1, description="Train steps of rounds >= 2; null = train.steps.")
    count: int = Field(
        1, ge=1, description="Rounds `gdro pipeline` runs: 1 is the single default round, r adds rounds 2..r after it. "
        "rounds/dvc.yaml lists its rounds itself (its `previous` map).",
    )


class Reward(Section):
    backend: Literal["easyocr", "rapidocr"] = "easyocr"
    substring_full_credit: bool = Field(
        False, description="Flow-GRPO option: full reward when the target occurs inside the read text."
    )
    upscale: int = Field(2, ge=1, description="Integer upscale before reading (small renders read better).")
    pad: int = Field(16, ge=0, description="Border in pixels added around the upscaled image.")
    restrict_to_alphabet: bool = Field(True, description="Limit the reader to the world's alphabet.")
    batch_size: int = Field(32, ge=1, description="Images per reader call on each worker.")
    max_error_share: float = Field(
        0.01, ge=0, le=1,
        description="Share of images the reader may fail on (each scored 0, its error kept in its row) before "
        "`score` fails.",
    )
    reader_mode: Literal["full", "recognizer"] = Field(
        "full",
        description="easyocr: 'full' detects text boxes (CRAFT) then reads them; 'recognizer' reads the ink's "
        "bounding box as one line (built-in world only: its images are single lines of text).",
    )


class Rewards(Section):
    """Which rewards score the images, and how they sum (a weighted sum, as Flow-GRPO's ``multi_score``).

    A name is a built-in reward (``gdro rewards`` lists them), one a package registers under the ``gdro.rewards``
    entry point, or a local class as ``module:Class``. Empty ``weights``: the task's own reward alone."""

    weights: dict[str, float] = Field(
        default_factory=dict,
        description="Reward name -> weight, e.g. {ocr: 0.7, clip_score: 0.3}; each part stays a column of the "
        "reward table. Empty: the task's own reward (ocr or geneval) with weight 1.",
    )
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Reward name -> that reward's options (e.g. clip_score: {model_dir: models/clip}); each "
        "reward validates its own.",
    )

    @field_validator("weights")
    @classmethod
    def _finite_weights(cls, weights: dict[str, float]) -> dict[str, float]:
        for name, w in weights.items():
            if not name.strip():
                raise ValueError("a reward name is empty")
            if w != w or w in (float("inf"), float("-inf")):
                raise ValueError(f"the weight of {name!r} is not a finite number")
        if weights and not any(weights.values()):
            raise ValueError("every weight is 0: give at least one reward a weight")
        return weights

    @model_validator(mode="after")
    def _options_for_used(self) -> Rewards:
        unused = sorted(set(self.options) - set(self.weights))
        if unused and self.weights:
            raise ValueError(f"options for {', '.join(map(repr, unused))}, which rewards.weights does not use: "
                             "add it to rewards.weights or remove its options")
        if unused:  # no weights: the task's own reward alone, which takes its settings from `reward`, not from here
            raise ValueError(f"options for {', '.join(map(repr, unused))}, but rewards.weights is empty (the task's "
                             "own reward alone, set under `reward`): name it in rewards.weights or remove its options")
        return self


class Scale(Section):
    """Where rollout and scoring shards run; the results are identical whatever is chosen here."""

    runner: Literal["local", "dask", "ray"] = Field(
        "local", description="local: in this process, one shard after another; dask: prefect-dask; ray: prefect-ray."
    )
    workers: int = Field(
        0, ge=0, description="Worker processes for dask/ray (0 = one per visible GPU, or 1 without GPUs)."
    )
    address: str = Field(
        "", description="An existing Dask scheduler (tcp://host:8786) or Ray cluster (ray://host:10001, or 'auto'); "
        "empty starts a local cluster with `workers` workers.",
    )
    threads_per_worker: int = Field(0, ge=0, description="Torch threads in each worker (0 = CPU cores / workers).")
    threads: int = Field(
        0, ge=0, description="Torch CPU threads of each stage process; 0 = OMP_NUM_THREADS when set, else 1. One is "
        "never pathological: beside other work, torch's default (every core) made pretraining ~8x slower on two "
        "cores (benchmarks/threads.py, docs/experiments/threads.md); raise it for a real checkpoint on a quiet CPU.",
    )

    @model_validator(mode="after")
    def _address_needs_cluster(self) -> Scale:
        if self.address and self.runner == "local":
            raise ValueError(
                f"scale.address is {self.address!r} but scale.runner is 'local': set runner to dask or ray, "
                "or clear address"
            )
        return self


class Lora(Section):
    rank: int = Field(32, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=list,
        description="Transformer modules the LoRA adapts; [] = the model family's default (SD3: attention "
        "projections; FLUX: attention, feed-forward and the single blocks' proj_mlp/proj_out).",
    )


ONLINE_OBJECTIVES = ("flow_grpo", "diffusion_nft", "awm")
"""Objectives that sample their own groups from the policy while training (no rollout pool)."""


class Train(Section):
    objective: Literal[
        "gdro", "dpo", "dpo_anchor", "offline_dpo", "sft_best", "lair", "flow_grpo", "diffusion_nft", "awm"
    ] = Field(
        "gdro",
        description="Loss over the offline groups (dpo: Diffusion-DPO, gamma ignored, tied pairs dropped; dpo_anchor: "
        "dpo + gamma * anchor; offline_dpo: best vs worst of each prompt's N; lair: centred-softmax-weighted implicit "
        "reward), or an online baseline sampling its own groups ('flow_grpo', 'diffusion_nft', 'awm').",
    )
    group_size: int = Field(6, ge=2, description="k members drawn from each prompt's pool per step.")
    groups_per_step: int = Field(8, ge=1)
    steps: int = Field(450, ge=1)
    lr: float = Field(3e-4, gt=0)
    beta: float = Field(12.0, gt=0, description="Implicit-reward scale; errors are means over latent elements.")
    tau: float = Field(0.05, ge=0, description="Soft-target temperature; 0 gives pure ranking.")
    gamma: float = Field(0.5, ge=0, description="Weight of the top-1 anchor.")
    positions: int = Field(0, ge=0, description="Rank positions in the loss; 0 = all k-1, 1 = top-1 only.")
    timestep_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    draws_per_group: int = Field(1, ge=1, description="(t, ε) draws per group per step, averaged.")
    member_sampling: Literal["random", "stratified"] = "random"
    noise: Literal["fresh", "prior"] = Field(
        "fresh", description="ε of the implicit reward: fresh per group, or each image's own rollout noise (prior)."
    )
    lair_tau: float = Field(0.05, ge=0, description="lair: temperature of the group weights softmax(r/τ) − 1/k.")
    lair_lambda: float = Field(
        1.0, gt=0, description="lair: quadratic penalty (λ/2) s² on the implicit reward; the optimum is s = w/λ."
    )
    grpo_prompts_per_iteration: int = Field(
        4, ge=1, description="online objectives: training prompts sampled per iteration."
    )
    grpo_group_size: int = Field(6, ge=2, description="online objectives: images per prompt per iteration (one group).")
    grpo_sample_steps: int = Field(
        10, ge=1, description="online objectives: sampler steps of each rollout (SDE for flow_grpo, ODE otherwise)."
    )
    grpo_eta: float = Field(0.7, gt=0, description="flow_grpo: SDE noise level η, σ_t = η √(t / (1 − t)).")
    grpo_timestep_fraction: float = Field(
        0.99, gt=0, le=1, description="online objectives: train on ⌊sample_steps · fraction⌋ steps (at least one); "
        "flow_grpo the first ones, diffusion_nft and awm a random subset of the sampler's timesteps per sample.",
    )
    grpo_clip_range: float = Field(1e-4, gt=0, description="flow_grpo: ratio clip ε (log-probs: means over elements).")
    grpo_adv_clip_max: float = Field(
        5.0, gt=0, description="online objectives: advantages clamped to [-max, max] (diffusion_nft maps them to "
        "r = A / (2 max) + 1/2)."
    )
    grpo_global_std: bool = Field(
        True, description="online objectives: advantage std over the whole iteration, not per group."
    )
    grpo_kl_beta: float = Field(
        0.04, ge=0, description="flow_grpo: β_KL on ‖μ_θ − μ_ref‖² / (2σ_t²), the reference code's KL scale."
    )
    grpo_inner_epochs: int = Field(1, ge=1, description="online objectives: passes over each iteration's samples.")
    grpo_minibatches: int = Field(
        2, ge=1, description="online objectives: optimiser steps per pass (shuffled minibatches)."
    )
    nft_beta: float = Field(
        0.1, gt=0, description="diffusion_nft: β of the implicit policies v± = v_old ± β (v_θ − v_old) (reference "
        "OCR recipe; its GenEval / PickScore recipes use 1.0)."
    )
    nft_kl_beta: float = Field(
        1e-4, ge=0, description="diffusion_nft: weight of ‖v_θ − v_ref‖² (element mean) to the reference, adapter off."
    )
    nft_decay_flat: int = Field(
        75, ge=0, description="diffusion_nft: optimiser steps before the sampling policy starts to lag (decay 0 until then)."
    )
    nft_decay_rate: float = Field(
        0.0075, ge=0, description="diffusion_nft: the sampling policy's decay is min((steps − flat) · rate, max)."
    )
    nft_decay_max: float = Field(
        0.999, ge=0, lt=1, description="diffusion_nft: largest decay of the sampling policy's soft update."
    )
    awm_kl_beta: float = Field(
        0.0, ge=0, description="awm: weight of ‖v_θ − v_ref‖² (element mean) to the reference, adapter off; 0 = off."
    )
    lora: Lora = Lora()
    ema_max_decay: float = Field(0.5, ge=0, lt=1, description="EMA decay is min(ema_rate * step, ema_max_decay).")
    ema_rate: float = Field(0.001, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(10, ge=1)
    seed: int = Field(0, description="Seeds the LoRA initialisation and every draw of the loop (explicit generators).")
    num_processes: int = Field(
        1, ge=1, description="Data-parallel processes (one per GPU); > 1 makes `gdro train` start itself under torchrun."
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Micro-batches per optimiser step; groups_per_step is split over processes x micro-batches."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute transformer activations in backward (less memory).")
    optimizer: Literal["adamw", "adamw_fused", "adamw_8bit"] = Field(
        "adamw", description="torch AdamW, its fused kernel, or bitsandbytes' 8-bit AdamW (needs bitsandbytes)."
    )
    allow_tf32: bool = Field(False, description="TF32 matmuls and convolutions on Ampere+ GPUs (faster, ~10-bit mantissa).")

    @model_validator(mode="after")
    def _global_batch_splits(self) -> Train:
        online = self.objective in ONLINE_OBJECTIVES
        if online and self.num_processes > 1:
            raise ValueError(f"objective {self.objective!r} (online) trains in one process: set num_processes to 1")
        share = self.num_processes * self.gradient_accumulation_steps
        if not online and self.groups_per_step % share:
            raise ValueError(
                f"groups_per_step ({self.groups_per_step}) must divide evenly over num_processes ({self.num_processes}) "
                f"x gradient_accumulation_steps ({self.gradient_accumulation_steps}): change one of them"
            )
        return self


class Evaluate(Section):
    images_per_prompt: int = Field(2, ge=1, description="Held-out images per test prompt, same seeds for base and trained.")
    seed: int = 5000
    grid_prompts: int = Field(16, ge=1)
    checkpoint_every: int = Field(
        150, ge=0, description="Evaluate reward, judge and corrected score on validation prompts every N train steps (0 = last step only)."
    )
    checkpoint_prompts: int = Field(32, ge=1, description="Validation prompts used for those checkpoint evaluations.")
    checkpoint_images_per_prompt: int = Field(
        1, ge=1, description="Images per validation prompt at each checkpoint (more: a less noisy choice of adapter)."
    )
    keep: Literal["best_corrected", "last"] = Field(
        "best_corrected", description="Which adapter train keeps: the best corrected score, or the last step."
    )
    tie_se: float = Field(
        1.0, ge=0, description="best_corrected: checkpoints within this many paired standard errors of the best "
        "corrected score are tied, and the tied one with the highest reward is kept (0 = the best corrected alone)."
    )
    hacking_window: int = Field(3, ge=2, description="Checkpoints over which a hacking trend is flagged.")
    train_prompts: int = Field(
        0, ge=0, description="Also score base and trained on this many training prompts with fresh seeds (metrics "
        "base_train, trained_train): did training improve its own prompts, or only not carry over? 0 = off."
    )
    train_seed: int = Field(
        9000, ge=0, description="First seed of that evaluation; its seeds must miss every round's rollout seeds."
    )
    bootstrap_samples: int = Field(
        1000, ge=0, description="Resamples of the held-out prompts behind metrics.json's confidence intervals (ci), "
        "paired for base and trained; 0 = no intervals.",
    )
    ci_level: float = Field(0.95, gt=0, lt=1, description="Coverage of those intervals.")
    second_reader: Literal["auto", "none", "easyocr", "rapidocr"] = Field(
        "auto", description="OCR: also read the held-out images with a reader training never used (metrics "
        "second_reward, second_exact), so a gain that fits the training reader's quirks shows; auto = the backend "
        "reward.backend is not, when installed.",
    )
    reader_mode: Literal["full", "recognizer"] | None = Field(
        None, description="OCR: the easyocr reader mode that reads held-out, validation and ceiling images; null = "
        "reward.reader_mode. Set 'full' to score the stored groups cheaply (reward.reader_mode: recognizer) and "
        "still read every reported number with the full reader.",
    )
    save_images: bool = Field(
        False, description="Also write every held-out image, base and trained, one folder per prompt as GenEval's "
        "generator lays them out (reports/heldout_images/<base|trained>/<prompt index>/samples/<n>.png beside the "
        "prompt's metadata.jsonl), for GenEval's own evaluation script or any other tool to score.",
    )


class JudgeParams(Section):
    """The quality judge behind the corrected score."""

    kind: Literal["pixel", "unified_reward"] = Field(
        "pixel", description="'pixel': the built-in world's judge; 'unified_reward': a local VLM judge."
    )
    model_path: str = Field("", description="Local directory of the UnifiedReward-style VLM (kind unified_reward).")
    task: Literal["auto", "ocr", "geneval", "general"] = Field(
        "auto", description="Which judge dimensions make û: auto follows the task (geneval drops alignment).")
    reference_images: int = Field(256, ge=8, description="Clean renders the pixel judge's statistics come from.")
    z_scale: float = Field(3.0, gt=0, description="Pixel judge: z-score at which a dimension loses half its score.")
    reference_supersample: int = Field(
        4, ge=1, description="GenEval world's pixel judge: half its references are drawn this many times larger at a "
        "sub-pixel offset and area-averaged (anti-aliased); 1 draws all pixel-aligned."
    )
    max_new_tokens: int = Field(256, ge=8, description="VLM judge: generation length.")
    device: str = Field("auto", description="VLM judge device: 'auto' picks CUDA when present, else CPU.")


GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")


class GenEvalWorld(Section):
    """The built-in GenEval world: flat shapes in flat colours on a black canvas."""

    height: int = Field(32, ge=8, description="Image height in pixels.")
    width: int = Field(32, ge=8, description="Image width in pixels.")
    object_size: int = Field(9, ge=3, description="Side in pixels of the box a shape is drawn in.")
    jitter: int = Field(2, ge=0, description="Random change of object_size in pixels (render diversity).")
    grid: int = Field(
        0, ge=0, description="Cell side in pixels: each object lies inside one cell of this grid (fewer places to "
        "learn); 0 places objects anywhere."
    )


class GenEvalDetector(Section):
    """The detector and GenEval's rules (its evaluation script's constants are the defaults)."""

    kind: Literal["exact", "mask2former"] = Field(
        "exact", description="'exact': the built-in world's palette detector; 'mask2former': Mask2Former + CLIP colours."
    )
    threshold: float = Field(0.3, ge=0, le=1, description="Detection confidence threshold (GenEval THRESHOLD).")
    counting_threshold: float = Field(0.9, ge=0, le=1, description="Threshold for counting prompts (COUNTING_THRESHOLD).")
    max_objects: int = Field(16, ge=1, description="Detections kept per class (MAX_OBJECTS).")
    nms_threshold: float = Field(1.0, gt=0, le=1, description="Per-class NMS IoU; 1 keeps every box (NMS_THRESHOLD).")
    position_threshold: float = Field(
        0.1, ge=0, description="Share of the two boxes' sizes an offset must exceed to count (POSITION_THRESHOLD)."
    )
    mask2former_path: str = Field("", description="Local Mask2Former COCO-instance checkpoint (kind mask2former).")
    clip_path: str = Field("", description="Local CLIP ViT-L/14 checkpoint for colour classification (kind mask2former).")
    clip_colors: list[str] = Field(
        default_factory=lambda: list(GENEVAL_COLORS), description="Colour names the CLIP classifier chooses among."
    )
    min_pixels: int = Field(12, ge=1, description="Exact detector: smallest connected blob that counts as an object.")
    palette_tolerance: float = Field(
        60.0, gt=0, description="Exact detector: largest RGB distance at which a pixel takes a palette colour."
    )
    batch_size: int = Field(8, ge=1, description="Images per detector forward pass.")
    device: str = Field("auto", description="Detector device: 'auto' picks CUDA when present, else CPU.")


class GenEval(Section):
    """The GenEval task: compositional prompts scored by GenEval's rules."""

    metadata_dir: str = Field(
        "", description="Directory of GenEval / Flow-GRPO metadata (train_metadata.jsonl, test_metadata.jsonl, "
        "evaluation_metadata.jsonl); '' generates prompt sets over classes and colors.",
    )
    classes: list[str] = Field(
        default_factory=lambda: ["square", "circle", "triangle", "cross"], min_length=2,
        description="Object classes of generated prompts (the built-in world draws these four shapes).",
    )
    colors: list[str] = Field(
        default_factory=lambda: ["red", "green", "blue", "yellow"], min_length=2,
        description="Colours of generated prompts (the built-in world's palette).",
    )
    max_count: int = Field(4, ge=2, le=4, description="Largest count of counting prompts (GenEval: 2 to 4).")
    tags: list[Literal["single_object", "two_object", "counting", "colors", "position", "color_attr"]] = Field(
        default_factory=lambda: list(GENEVAL_TAGS), min_length=1, description="Tags of generated prompts, in turn."
    )
    reward: Literal["score", "correct"] = Field(
        "score", description="Training reward: Flow-GRPO's partial-credit score, or GenEval's per-prompt 0/1 correctness."
    )
    clean_coherence: float = Field(
        2.5, ge=0, le=5, description="Judge coherence at or above which a held-out image counts as clean "
        "(metrics clean_share and geneval_clean: GenEval on clean images, beside the headline).",
    )
    world: GenEvalWorld = GenEvalWorld()
    detector: GenEvalDetector = GenEvalDetector()

    @model_validator(mode="after")
    def _distinct(self) -> GenEval:
        for name in ("classes", "colors"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"geneval.{name} has repeated entries: {values}")
        return self


SWEEPABLE = ("train.", "evaluate.", "judge.")


class Serve(Section):
    """`gdro serve` / `make ui`: this project's Prefect server and MLflow tracking server, on loopback only."""

    host: Literal["127.0.0.1"] = Field("127.0.0.1", description="Bind address; the servers listen on 127.0.0.1 only.")
    prefect_port: int = Field(4200, ge=1024, le=65535, description="Port of the Prefect server (UI and API).")
    mlflow_port: int = Field(5000, ge=1024, le=65535, description="Port of the MLflow tracking server over tracking.uri.")
    startup_timeout: float = Field(180.0, gt=0, description="Seconds to wait for each server's health check.")
    deployments: bool = Field(
        True, description="Also serve the pipeline and sweep deployments, so the Prefect UI can start and schedule them."
    )
    concurrent_runs: int = Field(1, ge=1, description="Deployment runs executed at once by the served deployments.")
    pipeline_cron: str = Field("", description="Cron schedule of the pipeline deployment ('' = started by hand only).")
    sweep_cron: str = Field("", description="Cron schedule of the sweep deployment ('' = started by hand only).")
    timezone: str = Field("UTC", description="Time zone of the cron schedules.")

    @model_validator(mode="after")
    def _distinct_ports(self) -> Serve:
        if self.prefect_port == self.mlflow_port:
            raise ValueError(f"prefect_port and mlflow_port are both {self.prefect_port}: give them different ports")
        return self


class Sweep(Section):
    """`gdro sweep`: train + evaluate per config, all on the cached rollouts and reward table."""

    name: str = Field(
        "sweep", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Sweep name; config outputs go to <models_dir>/sweeps/<name>/ and <reports_dir>/sweeps/<name>/.",
    )
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="Dotted param -> values; every combination is one config (train.beta: [6, 12])."
    )
    configs: list[dict[str, Any]] = Field(
        default_factory=list, description="Explicit configs (dotted param -> value), run after the grid's."
    )
    max_workers: int = Field(
        1, ge=1, description="Configs trained at once by Prefect's thread-pool task runner (1 on CPU; more on a large GPU)."
    )

    @model_validator(mode="after")
    def _sweepable(self) -> Sweep:
        for key in [*self.grid, *(k for c in self.configs for k in c)]:
            if not key.startswith(SWEEPABLE):
                raise ValueError(
                    f"sweep key '{key}' is not a train.*, evaluate.* or judge.* param: a sweep reuses the cached "
                    "rollouts and reward table, so set other params in params.yaml and run `dvc repro score`"
                )
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"sweep grid '{key}' has no values: list at least one")
        return self


class Registry(Section):
    """Registered adapters: which version is the champion and what `gdro compare` shows."""

    alias: str = Field("champion", description="Alias of the registered version with the best ranking metric.")
    rank_by: list[str] = Field(
        default_factory=lambda: ["trained.corrected", "trained.reward"], min_length=1,
        description="Evaluate metrics that rank versions: the first one any version has decides (versions without it "
        "never win).",
    )
    compare_params: list[str] = Field(
        default_factory=lambda: [
            "train.objective", "train.beta", "train.tau", "train.group_size", "train.gamma", "train.lr", "train.steps",
            "train.seed",
        ],
        description="Params shown beside the metrics by `gdro compare`.",
    )


class Data(Section):
    """Where the training groups come from: the model's own rollouts scored by the reward (``rollout`` + ``score``),
    or a manifest of your own images and rewards (``import``; docs/import-export.md)."""

    source: Literal["rollout", "import"] = Field(
        "rollout",
        description="rollout: dvc.yaml samples and scores (stages rollout, score); import: dvc.yaml's import stage "
        "reads data.manifest instead. Run `gdro stages --write` after changing it (`gdro check` says so).",
    )
    manifest: str = Field(
        "data/import/manifest.jsonl",
        description="The manifest `gdro import` reads (JSON lines, CSV or Parquet, by suffix): prompt, image "
        "(relative to the manifest, inside its folder), reward or one column per rewards.weights name, optional "
        "group, target, seed. The import stage depends on the manifest's whole folder.",
    )
    resize: Literal["refuse", "resize", "center_crop"] = Field(
        "refuse",
        description="An image whose size is not the task's (params.image_shape): refuse (error naming the row), "
        "resize (stretch to the size) or center_crop (scale to cover, crop the middle).",
    )
    small_groups: Literal["drop", "refuse"] = Field(
        "drop",
        description="Groups with fewer images than train.group_size: drop them (counted and reported) or refuse "
        "the manifest naming the first. Single-image groups and groups whose rewards are all equal are always "
        "dropped (they carry no ranking).",
    )

    @field_validator("manifest")
    @classmethod
    def _named(cls, manifest: str) -> str:
        if not manifest.strip():
            raise ValueError("data.manifest is empty: name the manifest file `gdro import` reads")
        if Path(manifest).suffix.lower() not in (".jsonl", ".csv", ".parquet"):
            raise ValueError(f"data.manifest {manifest!r}: the suffix says the format: .jsonl, .csv or .parquet")
        return manifest


class Params(Section):
    seed: int = 0
    task: Literal["ocr", "geneval", "general"] = Field(
        "ocr", description="What images are asked for and rewarded by: ocr and geneval have a built-in world; "
        "general is any prompt file (one prompt per line) scored by rewards.weights, on your own checkpoint.")
    paths: Paths = Paths()
    tracking: Tracking = Tracking()
    world: World = World()
    prompts: Prompts = Prompts()
    model: Model = Model()
    pretrain: Pretrain = Pretrain()
    sampler: Sampler = Sampler()
    rollout: Rollout = Rollout()
    rounds: Rounds = Rounds()
    reward: Reward = Reward()
    rewards: Rewards = Rewards()
    train: Train = Train()
    evaluate: Evaluate = Evaluate()
    judge: JudgeParams = JudgeParams()
    geneval: GenEval = GenEval()
    serve: Serve = Serve()
    sweep: Sweep = Sweep()
    registry: Registry = Registry()
    scale: Scale = Scale()
    data: Data = Data()

    @property
    def judge_task(self) -> str:
        """The task whose judge dimensions make û: ``judge.task``, or the task itself when that is ``auto``."""
        return self.task if self.judge.task == "auto" else self.judge.task

    @property
    def rollout_steps(self) -> int:
        """Sampler steps of the rollouts (``rollout.steps``, else ``sampler.steps``)."""
        return self.rollout.steps or self.sampler.steps

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of the task's images: ``geneval.world`` in colour for GenEval, ``world`` in
        grayscale otherwise. Whether a model family can take that size is checked where the model is known
        (:func:`gdro_core.models.check_image_size`)."""
        if self.task == "geneval":
            return self.geneval.world.height, self.geneval.world.width, 3
        if self.task == "general":
            return self.world.height, self.world.width, 3
        return self.world.height, self.world.width, 1

    @model_validator(mode="after")
    def _attribute_errors_need_geneval(self) -> Params:
        if self.pretrain.attribute_errors and self.task != "geneval":
            raise ValueError(f"pretrain.attribute_errors misstates GenEval scenes' colours, counts and relations; "
                             f"task {self.task!r} has none: set it to 0 (pretrain.caption_noise mislabels any task)")
        return self

    @model_validator(mode="after")
    def _general_task_needs(self) -> Params:
        for name in self.rewards.weights:
            if name in ("ocr", "geneval") and name != self.task:
                raise ValueError(f"reward {name!r} reads its task's prompt records (a quoted text, GenEval "
                                 f"metadata): it needs task {name}, not {self.task}")
        if self.task != "general":
            return self
        if not self.rewards.weights:
            raise ValueError("task 'general' has no reward of its own: name one in rewards.weights "
                             "(e.g. {clip_score: 1.0}, or a module:Class of yours)")
        if not self.prompts.source:
            raise ValueError("task 'general' reads its prompts from a file: set prompts.source (one prompt per "
                             "line, or JSON lines with a 'prompt' field)")
        if self.judge.kind == "pixel":
            raise ValueError("task 'general' has no built-in world for the pixel judge behind the corrected score: "
                             "set judge.kind: unified_reward and judge.model_path to a local VLM judge")
        if self.model.source == "builtin":
            raise ValueError("task 'general' has no built-in world to pretrain the built-in model on: set "
                             "model.source to your checkpoint, or use task ocr or geneval with rewards.weights")
        return self

    @model_validator(mode="after")
    def _recognizer_needs_single_lines(self) -> Params:
        for key, mode in (("reward.reader_mode", self.reward.reader_mode),
                          ("evaluate.reader_mode", self.evaluate.reader_mode)):
            if mode != "recognizer":
                continue
            if self.reward.backend != "easyocr":
                raise ValueError(f"{key}: recognizer is easyocr's mode; reward.backend is {self.reward.backend!r}, "
                                 "which always detects: set reward.backend: easyocr or the mode to full")
            if self.model.source != "builtin":
                raise ValueError(f"{key}: recognizer reads the whole ink box as one line, right only for the built-in "
                                 "world's single-line images; a real checkpoint's images need the detector: set it "
                                 "to full")
        return self

    @model_validator(mode="after")
    def _group_fits_pool(self) -> Params:
        if self.train.group_size > self.rollout.images_per_prompt:
            raise ValueError(
                f"train.group_size ({self.train.group_size}) exceeds rollout.images_per_prompt "
                f"({self.rollout.images_per_prompt}); lower the first or raise the second"
            )
        if self.rounds.images_per_prompt is not None and self.train.group_size > self.rounds.images_per_prompt:
            raise ValueError(
                f"train.group_size ({self.train.group_size}) exceeds rounds.images_per_prompt "
                f"({self.rounds.images_per_prompt}); lower the first or raise the second"
            )
        return self


def reading_params(params: Params) -> Params:
    """The params that read held-out and validation images: ``reward`` with ``evaluate.reader_mode`` when set.
    The stored groups and the online methods' own samples are scored with ``reward`` as it is."""
    mode = params.evaluate.reader_mode
    if mode is None or mode == params.reward.reader_mode:
        return params
    return params.model_copy(update={"reward": params.reward.model_copy(update={"reader_mode": mode})})


def round_params(params: Params, round: int) -> Params:
    """The params round ``round`` runs with: round 1 is ``params`` itself; a later round samples new seeds
    (``rounds.seed_offset``), ``rounds.images_per_prompt`` images per prompt and trains ``rounds.steps`` steps."""
    if round < 1:
        raise ParamsError(f"round {round} does not exist: rounds count from 1 (the default pipeline)")
    if round == 1:
        return params
    r = params.rounds
    rollout = params.rollout.model_copy(update={
        "seed": params.rollout.seed + (round - 1) * r.seed_offset,
        "images_per_prompt": r.images_per_prompt or params.rollout.images_per_prompt,
    })
    train = params.train.model_copy(update={"steps": r.steps or params.train.steps})
    return params.model_copy(update={"rollout": rollout, "train": train})


def check_round_seeds(params: Params, n_prompts: int) -> None:
    """Each round's seeds must not reach the next round's: its images would repeat another round's noise."""
    per_round = n_prompts * max(params.rollout.images_per_prompt, params.rounds.images_per_prompt or 0)
    if per_round > params.rounds.seed_offset:
        raise ParamsError(
            f"rounds.seed_offset ({params.rounds.seed_offset}) is smaller than the {per_round} seeds one round draws "
            f"({n_prompts} prompts): rounds would reuse each other's noise; set rounds.seed_offset to at least "
            f"{per_round}"
        )


def check_train_eval_seeds(params: Params, n_train: int, round: int) -> None:
    """The training-prompt evaluation must draw noise that no rollout of rounds 1..``round`` drew for those
    prompts (``params`` as round ``round`` runs them: its rollout seed carries that round's offset)."""
    e, r = params.evaluate, params.rounds
    first, last = e.train_seed, e.train_seed + n_train * e.images_per_prompt
    per = max(params.rollout.images_per_prompt, r.images_per_prompt or 0)
    for k in range(1, round + 1):
        lo = params.rollout.seed - (round - k) * r.seed_offset
        hi = lo + n_train * per
        if first < hi and lo < last:
            raise ParamsError(
                f"evaluate.train_seed ({e.train_seed}) reuses round {k}'s rollout seeds ({lo}..{hi - 1}): the "
                f"training-prompt evaluation would score images training saw; set evaluate.train_seed to at least {hi}"
            )


MAX_SHOWN = 120
"""Characters of a bad value an error shows; a section's whole mapping is never printed."""


def _describe(err: ValidationError, source: str, overridden: tuple[str, ...] = ()) -> str:
    lines = [f"invalid params in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        where = " (given with --set)" if key in overridden else ""
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}'{where}: remove it or fix its spelling")
            continue
        got = e.get("input")
        shown = "" if isinstance(got, (dict, list)) or len(repr(got)) > MAX_SHOWN else f" (got {got!r})"
        lines.append(f"  '{key}'{where}: {e['msg'].removeprefix('Value error, ')}{shown}")
    return "\n".join(lines)


def parse_params(data: dict[str, Any], source: str = "params", overridden: tuple[str, ...] = ()) -> Params:
    """Validate a params mapping; raise :class:`ParamsError` naming each bad key (and which came from --set)."""
    try:
        return Params.model_validate(data or {})
    except ValidationError as err:
        raise ParamsError(_describe(err, source, overridden)) from None


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key written twice in one mapping."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys, where DVC (ruamel.yaml) refuses the file: a section written twice (a
    ``train:`` added at the bottom) would silently replace the first one's every setting here."""

    def construct_mapping(self, node, deep=False):
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a merge key (<<: *anchor) may be overridden by the mapping's own keys
            key = str(self.construct_object(key_node))
            if key in seen:
                raise DuplicateKeyError(None, None, f"'{key}' appears twice, first at line {seen[key]}",
                                        key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate a params file, with optional dotted-key overrides (``{'train.beta': 6}``)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path} (run from the project root or pass --params)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ParamsError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x}): save the file as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        lines = text.splitlines()
        tab = mark is not None and mark.line < len(lines) and "\t" in lines[mark.line]
        if isinstance(err, DuplicateKeyError):
            hint = "the later one would replace the first: merge them into one"
        elif tab:
            hint = "YAML does not allow tabs for indentation: indent with spaces"
        else:
            hint = "fix the YAML syntax there"
        raise ParamsError(f"{path}{where} is not valid YAML ({getattr(err, 'problem', err)}): {hint}") from None
    if data is None:
        raise ParamsError(f"{path} is empty: restore it (`git checkout {path.name}`) or write the sections you change "
                          "(train:, sampler:, ...); an explicit `{}` takes every default")
    if not isinstance(data, dict):
        raise ParamsError(f"{path} must hold a mapping of sections (train:, sampler:, ...), not {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for depth, p in enumerate(parents, 1):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ParamsError(f"cannot set '{dotted}': '{'.'.join(parents[:depth])}' is a value "
                                  f"({node!r}), not a section; set '{'.'.join(parents[:depth])}' itself")
        node[leaf] = value
    return parse_params(data, str(path) + (" with --set" if overrides else ""), tuple(overrides or ()))


def section_dict(params: Params, *names: str) -> dict[str, Any]:
    """Flattened ``{'train.beta': 12, ...}`` of the named sections or dotted fields, for MLflow params."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            out[prefix] = value

    dumped = params.model_dump()
    for name in names:
        node = dumped
        for part in name.split("."):
            node = node[part]
        walk(name, node)
    return out


def stage_threads(threads: int) -> int:
    """Torch CPU threads for a stage process: ``scale.threads``, else ``OMP_NUM_THREADS`` when set, else 1."""
    if threads:
        return threads
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else 1
