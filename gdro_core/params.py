"""Typed, validated ``params.yaml``: the single source of truth for every knob.

Each section is a pydantic model that forbids unknown keys, so a typo such as ``train.betta``
is an error naming the key, never a silent default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ParamsError(ValueError):
    """A params file that cannot be used; the message names the key and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class Prompts(Section):
    n_train: int = Field(64, ge=1, description="Training prompts (post-training set).")
    n_test: int = Field(64, ge=1, description="Held-out prompts; their targets never occur in train.")
    seed: int = 0
    templates: list[str] = Field(
        default_factory=lambda: [
            'a sign that says "{text}"',
            'the word "{text}" on a wall',
            'a poster reading "{text}"',
            'a label: "{text}"',
        ],
        description="Prompt templates; each must contain a quoted {text} placeholder.",
    )

    @model_validator(mode="after")
    def _templates(self) -> Prompts:
        for t in self.templates:
            if '"{text}"' not in t:
                raise ValueError(f"template {t!r} must contain the quoted placeholder \"{{text}}\"")
        return self


class BuiltinModel(Section):
    layers: int = Field(4, ge=1, description="SD3 transformer blocks.")
    heads: int = Field(4, ge=1)
    head_dim: int = Field(32, ge=8)
    patch_size: int = Field(4, ge=1)
    text_dim: int = Field(128, ge=8, description="Width of the tiny CLIP text encoder.")
    text_layers: int = Field(2, ge=1)
    max_tokens: int = Field(32, ge=8, description="Tokenizer max length.")


class Model(Section):
    source: str = Field(
        "builtin",
        description="'builtin' (pretrained here by the base stage) or a local diffusers checkpoint directory / hub id.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", description="'auto' picks CUDA when present (via accelerate), else CPU.")
    builtin: BuiltinModel = BuiltinModel()


class Pretrain(Section):
    steps: int = Field(1500, ge=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    cond_dropout: float = Field(0.1, ge=0, le=1, description="Share of captions replaced by '' (enables CFG).")
    caption_noise: float = Field(
        0.0, ge=0, le=1, description="Share of captions whose target has one wrong character (imperfect base)."
    )
    checkpoint_every: int = Field(250, ge=1)
    log_every: int = Field(25, ge=1)
    seed: int = 0


class Sampler(Section):
    steps: int = Field(20, ge=1, description="Euler ODE steps (FlowMatchEulerDiscreteScheduler).")
    guidance: float = Field(3.0, ge=0, description="Classifier-free guidance scale; <= 1 disables CFG.")
    shift: float = Field(1.0, gt=0, description="Scheduler timestep shift.")
    batch_size: int = Field(64, ge=1)


class Rollout(Section):
    images_per_prompt: int = Field(16, ge=2, description="Pool size N per training prompt.")
    seed: int = 1000


class Reward(Section):
    backend: Literal["easyocr", "rapidocr"] = "easyocr"
    substring_full_credit: bool = Field(
        False, description="Flow-GRPO option: full reward when the target occurs inside the read text."
    )
    upscale: int = Field(4, ge=1, description="Integer upscale before reading (small renders read better).")
    pad: int = Field(16, ge=0, description="Border in pixels added around the upscaled image.")
    restrict_to_alphabet: bool = Field(True, description="Limit the reader to the world's alphabet.")
    batch_size: int = Field(32, ge=1)


class Lora(Section):
    rank: int = Field(32, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    )


class Train(Section):
    objective: Literal["gdro", "dpo", "sft_best"] = Field("gdro", description="Loss over the offline groups.")
    group_size: int = Field(6, ge=2, description="k members drawn from each prompt's pool per step.")
    groups_per_step: int = Field(4, ge=1)
    steps: int = Field(400, ge=1)
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
    lora: Lora = Lora()
    ema_max_decay: float = Field(0.5, ge=0, lt=1, description="EMA decay is min(ema_rate * step, ema_max_decay).")
    ema_rate: float = Field(0.001, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    seed: int = 0


class Evaluate(Section):
    images_per_prompt: int = Field(1, ge=1)
    seed: int = 5000
    grid_prompts: int = Field(16, ge=1)
    checkpoint_every: int = Field(
        100, ge=0, description="Evaluate held-out reward, judge and corrected score every N train steps (0 = last step only)."
    )
    checkpoint_prompts: int = Field(32, ge=1, description="Held-out prompts used for those checkpoint evaluations.")
    keep: Literal["best_corrected", "last"] = Field(
        "best_corrected", description="Which adapter train keeps: the best corrected score, or the last step."
    )
    hacking_window: int = Field(3, ge=2, description="Checkpoints over which a hacking trend is flagged.")


class JudgeParams(Section):
    """The quality judge behind the corrected score."""

    kind: Literal["pixel", "unified_reward"] = Field(
        "pixel", description="'pixel': the built-in world's judge; 'unified_reward': a local VLM judge."
    )
    model_path: str = Field("", description="Local directory of the UnifiedReward-style VLM (kind unified_reward).")
    task: Literal["ocr", "geneval"] = Field("ocr", description="Which judge dimensions make û (geneval drops alignment).")
    reference_images: int = Field(256, ge=8, description="Clean renders the pixel judge's statistics come from.")
    z_scale: float = Field(3.0, gt=0, description="Pixel judge: z-score at which a style feature loses half its score.")
    max_new_tokens: int = Field(256, ge=8, description="VLM judge: generation length.")


class Params(Section):
    seed: int = 0
    paths: Paths = Paths()
    tracking: Tracking = Tracking()
    world: World = World()
    prompts: Prompts = Prompts()
    model: Model = Model()
    pretrain: Pretrain = Pretrain()
    sampler: Sampler = Sampler()
    rollout: Rollout = Rollout()
    reward: Reward = Reward()
    train: Train = Train()
    evaluate: Evaluate = Evaluate()
    judge: JudgeParams = JudgeParams()

    @model_validator(mode="after")
    def _group_fits_pool(self) -> Params:
        if self.train.group_size > self.rollout.images_per_prompt:
            raise ValueError(
                f"train.group_size ({self.train.group_size}) exceeds rollout.images_per_prompt "
                f"({self.rollout.images_per_prompt}); lower the first or raise the second"
            )
        return self


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"invalid params in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}': remove it or fix its spelling")
        else:
            lines.append(f"  '{key}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_params(data: dict[str, Any], source: str = "params") -> Params:
    """Validate a params mapping; raise :class:`ParamsError` naming each bad key."""
    try:
        return Params.model_validate(data or {})
    except ValidationError as err:
        raise ParamsError(_describe(err, source)) from None


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate a params file, with optional dotted-key overrides (``{'train.beta': 6}``)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path} (run from the project root or pass --params)")
    data = yaml.safe_load(path.read_text()) or {}
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return parse_params(data, str(path))


def section_dict(params: Params, *names: str) -> dict[str, Any]:
    """Flattened ``{'train.beta': 12, ...}`` of the named sections, for MLflow params."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            out[prefix] = value

    dumped = params.model_dump()
    for name in names:
        walk(name, dumped[name])
    return out
