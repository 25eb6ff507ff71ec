"""Cost of one offline GDRO step against one online Flow-GRPO iteration, at full model size.

SD3.5-Medium- and FLUX.1-dev-sized transformers are built from their published configs with random
weights (timing, memory and FLOPs do not depend on the weights) and wrapped in their model family
(:meth:`gdro_core.models.family.DiffusersFlowModel.from_transformer`: the family's own velocity call,
FLUX packing and guidance embedding, timestep scaling and sampling schedule), with the adapter, optimiser
and EMA of ``gdro train`` (:func:`gdro_core.training.loop.start_training`), bf16 on a CUDA device. For each
model, on one group of k images (default 6) at 512 px:

- GDRO: one call of :func:`gdro_core.training.loop.train_step`, the step ``gdro train`` runs, on one group:
  policy forward + backward on the k members and a reference forward (adapter off, no grad), one (t, ε)
  shared by the group, the Plackett-Luce loss plus the top-1 anchor, gradient clipping, the optimiser step
  and the EMA update.
- Flow-GRPO: one iteration of :func:`gdro_core.training.online_grpo.train_online` on one prompt: sampling
  the k images with its SDE sampler (``sample_trajectories``, CFG for SD3, the guidance embedding for
  FLUX.1-dev), then its training half (``update_policy``: the first ⌊steps · fraction⌋ denoising steps,
  policy forward + backward through the same guidance, a reference forward for the KL term when
  ``--kl-beta`` > 0, ``--grpo-minibatches`` optimiser steps, the EMA update).

Both leave out the text encoders, the VAE and the reward model, which the two methods share (GDRO
pays them once, offline, at rollout time): conditions are random tensors of the families' shapes. Run on
a GPU machine::

    python benchmarks/gpu_train_step.py --gradient-checkpointing     # writes reports/gpu_benchmark.json
    python benchmarks/gpu_train_step.py --toy                        # tiny configs, CPU, float32, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, get_args

import torch
from accelerate import Accelerator
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from gdro_core.data.rollout import Rollouts
from gdro_core.models.base import Condition
from gdro_core.models.family import DiffusersFlowModel
from gdro_core.models.flux import FluxModel
from gdro_core.models.sd3 import StableDiffusion3Model
from gdro_core.params import Lora, Model, Train
from gdro_core.training.loop import LoraEma, make_accelerator, start_training, train_step
from gdro_core.training.online_grpo import (
    Trajectories, sample_trajectories, sigma_schedule, train_timesteps, update_policy,
)

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (SD3Transformer2DModel, MMDiT-X)
SD3_5_MEDIUM = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm",
}
# ... and scheduler/scheduler_config.json
SD3_5_MEDIUM_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}

# black-forest-labs/FLUX.1-dev, transformer/config.json (FluxTransformer2DModel)
FLUX_1_DEV = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
# ... and scheduler/scheduler_config.json (the shift depends on the image size)
FLUX_1_DEV_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

# The same architectures shrunk to 2 layers and small widths, for the CPU smoke run.
SD3_TOY = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 16,
    "pos_embed_max_size": 8,
    "dual_attention_layers": [0],
    "qk_norm": "rms_norm",
}

FLUX_TOY = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 16,
    "guidance_embeds": True,
    "axes_dims_rope": [4, 6, 6],
}

VAE_FACTOR = 8  # both families' VAEs downsample 8x (what their pipelines assume without a VAE)
FLUX_PACK = 2  # FLUX packs 2x2 latent patches into one token
GIB = 2**30
MIN_RANKED = 2  # the fewest members a ranking loss takes
T = TypeVar("T")


@dataclass(frozen=True)
class ModelSpec:
    """One transformer to benchmark; ``text_tokens`` is the length of the text-encoder sequence."""

    name: str
    family: type[DiffusersFlowModel]
    config: dict
    scheduler: dict
    text_tokens: int

    @property
    def text_dim(self) -> int:
        return self.config["joint_attention_dim"]

    @property
    def pooled_dim(self) -> int:
        return self.config["pooled_projection_dim"]


# SD3: 77 CLIP tokens + 256 T5 tokens (the pipeline's default max_sequence_length); FLUX.1-dev: 512 T5 tokens.
FULL_SPECS = {
    "sd3.5-medium": ModelSpec("sd3.5-medium", StableDiffusion3Model, SD3_5_MEDIUM, SD3_5_MEDIUM_SCHEDULER, 77 + 256),
    "flux.1-dev": ModelSpec("flux.1-dev", FluxModel, FLUX_1_DEV, FLUX_1_DEV_SCHEDULER, 512),
}
TOY_TEXT_TOKENS = 8
TOY_SPECS = {
    "sd3.5-medium": ModelSpec("sd3.5-medium", StableDiffusion3Model, SD3_TOY, SD3_5_MEDIUM_SCHEDULER, TOY_TEXT_TOKENS),
    "flux.1-dev": ModelSpec("flux.1-dev", FluxModel, FLUX_TOY, FLUX_1_DEV_SCHEDULER, TOY_TEXT_TOKENS),
}


# ---------------------------------------------------------------- model and inputs


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_base(spec: ModelSpec, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """Randomly initialised transformer of the family's class, created directly on ``device`` in ``dtype``."""
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        transformer = spec.family.transformer_class(**spec.config)
    if any(p.dtype != dtype for p in transformer.parameters()):
        transformer.to(dtype=dtype)
    return transformer


def latent_side(resolution: int) -> int:
    if resolution % (VAE_FACTOR * FLUX_PACK):
        raise ValueError(f"--resolution must be a multiple of {VAE_FACTOR * FLUX_PACK}, got {resolution}")
    return resolution // VAE_FACTOR


def build_model(
    spec: ModelSpec, device: torch.device, dtype: torch.dtype, resolution: int, seed: int,
    shift: float | None = None, guidance: float | None = None,
) -> DiffusersFlowModel:
    """The family's FlowModel around a random-weight transformer and the published scheduler (no encoders, no VAE)."""
    latent_side(resolution)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(spec.scheduler)
    return spec.family.from_transformer(build_base(spec, device, dtype, seed), scheduler, resolution, resolution,
                                        shift=shift, guidance=guidance)


def image_tokens(spec: ModelSpec, resolution: int) -> int:
    """Image tokens the transformer attends over: (side / patch)² for SD3, (side / 2)² packed for FLUX."""
    side = latent_side(resolution)
    patch = FLUX_PACK if spec.family is FluxModel else spec.config["patch_size"]
    return (side // patch) ** 2


def make_cond(spec: ModelSpec, rows: int, gen: torch.Generator, dtype: torch.dtype) -> Condition:
    """Random text-encoder outputs of the family's shapes (what ``model.encode`` returns), on the CPU."""
    hidden = torch.randn(rows, spec.text_tokens, spec.text_dim, generator=gen)
    pooled = torch.randn(rows, spec.pooled_dim, generator=gen)
    return {"encoder_hidden_states": hidden.to(dtype), "pooled_projections": pooled.to(dtype)}


def make_group(
    spec: ModelSpec, model: DiffusersFlowModel, members: int, gen: torch.Generator
) -> tuple[Rollouts, Tensor]:
    """One prompt's pool of ``members`` random latents, its conditioning and rewards, as ``gdro train`` reads them."""
    latents = torch.randn((1, members, *model.latent_shape), generator=gen)
    rewards = torch.rand(1, members, generator=gen)
    return Rollouts(latents, make_cond(spec, 1, gen, model.dtype), rows=[]), rewards


def train_config(args: argparse.Namespace) -> Train:
    """The library's training settings for one group of ``--group-size`` (GDRO) or one prompt's k images (Flow-GRPO)."""
    k = args.group_size
    return Train(
        group_size=k, groups_per_step=1, grpo_group_size=k, grpo_prompts_per_iteration=1,
        grpo_sample_steps=args.sample_steps, grpo_timestep_fraction=args.train_timesteps, grpo_eta=args.eta,
        grpo_clip_range=args.clip_range, grpo_kl_beta=args.kl_beta, grpo_adv_clip_max=args.adv_clip_max,
        grpo_minibatches=args.grpo_minibatches, lora=Lora(rank=args.lora_rank, alpha=float(args.lora_rank)),
        gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer, seed=args.seed,
    )


def resized(cfg: Train, members: int) -> Train:
    """``cfg`` for a group of ``members`` (the FLOP-counting pass)."""
    return cfg.model_copy(update={"group_size": members, "grpo_group_size": members})


@dataclass
class Trainer:
    """A model with what ``start_training`` gives ``gdro train``: adapter parameters, optimiser, generator, EMA."""

    model: DiffusersFlowModel
    cfg: Train
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    gen: torch.Generator
    ema: LoraEma
    accelerator: Accelerator
    step: int = 0


def start(model: DiffusersFlowModel, cfg: Train) -> Trainer:
    """A fresh adapter (seeded from ``train.seed``), optimiser and EMA, through the library's own setup."""
    params, opt, gen, _, ema, _ = start_training(model, cfg, None)
    model.transformer.train()
    return Trainer(model, cfg, params, opt, gen, ema, make_accelerator(model))


# ---------------------------------------------------------------- the two training procedures (library calls)


def gdro_step(tr: Trainer, data: Rollouts, rewards: Tensor, cfg: Train | None = None) -> dict[str, float]:
    """One optimiser step of ``gdro train`` (:func:`train_step`) on the groups of ``data``."""
    tr.step += 1
    sums, grad_norm = train_step(tr.model, data, rewards, cfg or tr.cfg, tr.step, tr.params, tr.opt, tr.ema, tr.gen,
                                 tr.accelerator)
    return sums | {"grad_norm": grad_norm}


def grpo_sample(tr: Trainer, cond: Condition, null: Condition, sigmas: Tensor, guidance: float) -> Trajectories:
    """Flow-GRPO's sampling half: one SDE trajectory per row of ``cond`` (the transformer in eval mode, as there)."""
    tr.model.transformer.eval()
    return sample_trajectories(tr.model, cond, null, sigmas, tr.cfg.grpo_eta, guidance, tr.gen)


def grpo_update(tr: Trainer, traj: Trajectories, cond: Condition, null: Condition, rewards: Tensor, sigmas: Tensor,
                guidance: float, cfg: Train | None = None) -> dict[str, float]:
    """Flow-GRPO's training half on scored trajectories (:func:`update_policy`)."""
    tr.step += 1
    return update_policy(tr.model, traj, cond, null, rewards, sigmas, cfg or tr.cfg, guidance, tr.step, tr.params,
                         tr.opt, tr.ema, tr.gen)


def first_members(traj: Trajectories, m: int) -> Trajectories:
    return Trajectories(traj.states[:, :m], traj.next_states[:, :m], traj.log_probs[:, :m])


@contextmanager
def batch_sizes(transformer: torch.nn.Module) -> Iterator[list[int]]:
    """Batch sizes of the transformer's calls inside the block (classifier-free guidance doubles them)."""
    seen: list[int] = []
    handle = transformer.register_forward_pre_hook(
        lambda _m, _args, kwargs: seen.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        yield seen
    finally:
        handle.remove()


# ---------------------------------------------------------------- measurement


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """Wall-clock seconds of one call, the device synchronised before and after, and its result."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def repeat_timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return [timed(fn, device)[0] for _ in range(repeats)]


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call as torch's FlopCounterMode counts them (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@contextmanager
def checkpointing_off(transformer: torch.nn.Module) -> Iterator[None]:
    """Count model FLOPs without the forward that gradient checkpointing recomputes."""
    was_on = transformer.is_gradient_checkpointing
    if was_on:
        transformer.disable_gradient_checkpointing()
    try:
        yield
    finally:
        if was_on:
            transformer.enable_gradient_checkpointing()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """torch.cuda.max_memory_allocated in GiB; None off CUDA, where it does not exist."""
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def utilisation(flops: float, seconds: float, peak_tflops: float) -> float:
    """MFU = FLOPs / (seconds · peak FLOP/s)."""
    return flops / (seconds * peak_tflops * 1e12)


# ---------------------------------------------------------------- one model


def bench_gdro(tr: Trainer, spec: ModelSpec, args: argparse.Namespace, flop_members: int) -> dict:
    """(a) Median GDRO step time, peak memory, images/s, FLOPs and MFU on one group."""
    device = tr.model.device
    data, rewards = make_group(spec, tr.model, args.group_size, tr.gen)
    reset_peak(device)
    times = repeat_timed(lambda: gdro_step(tr, data, rewards), device, args.warmup, args.repeats)
    peak = peak_gib(device)
    small, small_rewards = make_group(spec, tr.model, flop_members, tr.gen)
    with checkpointing_off(tr.model.transformer):
        flops = count_flops(lambda: gdro_step(tr, small, small_rewards, resized(tr.cfg, flop_members)))
    flops *= args.group_size / flop_members
    step = statistics.median(times)
    return {
        "step_s": step,
        "step_s_all": times,
        "peak_memory_gib": peak,
        "images_per_s": args.group_size / step,
        "flops_per_step": flops,
        "achieved_tflops": flops / step / 1e12,
        "mfu": utilisation(flops, step, args.peak_tflops),
    }


def bench_grpo(tr: Trainer, spec: ModelSpec, args: argparse.Namespace, flop_members: int, guidance: float) -> dict:
    """(b) One Flow-GRPO iteration producing the same k trained samples: SDE sampling, then training."""
    device, k, cfg = tr.model.device, args.group_size, tr.cfg
    sigmas = sigma_schedule(tr.model, cfg.grpo_sample_steps)
    cond = {key: v.to(device).repeat_interleave(k, 0) for key, v in make_cond(spec, 1, tr.gen, tr.model.dtype).items()}
    null = {key: v.to(device) for key, v in make_cond(spec, 1, tr.gen, tr.model.dtype).items()}
    reset_peak(device)
    sampling, training, sample_batch, train_batch = [], [], [], []
    for i in range(args.warmup + args.grpo_repeats):
        rewards = torch.rand(k, generator=tr.gen)  # the reward model is left out
        with batch_sizes(tr.model.transformer) as seen_sampling:
            t_sample, traj = timed(lambda: grpo_sample(tr, cond, null, sigmas, guidance), device)
        with batch_sizes(tr.model.transformer) as seen_training:
            t_train, _ = timed(lambda: grpo_update(tr, traj, cond, null, rewards, sigmas, guidance), device)
        sample_batch, train_batch = seen_sampling, seen_training
        if i >= args.warmup:
            sampling.append(t_sample)
            training.append(t_train)
    peak = peak_gib(device)
    # FLOPs: one sampling step (full group) x steps; the training half on flop_members samples, scaled to k
    sample_flops = count_flops(lambda: grpo_sample(tr, cond, null, sigmas[:2], guidance)) * cfg.grpo_sample_steps
    m = flop_members
    small = {key: v[:m] for key, v in cond.items()}
    with checkpointing_off(tr.model.transformer):
        train_flops = count_flops(lambda: grpo_update(tr, first_members(traj, m), small, null, rewards[:m], sigmas,
                                                      guidance, resized(cfg, m)))
    flops = sample_flops + train_flops * k / m
    total = [a + b for a, b in zip(sampling, training)]
    iteration = statistics.median(total)
    return {
        "sampling_s": statistics.median(sampling),
        "training_s": statistics.median(training),
        "iteration_s": iteration,
        "iteration_s_all": total,
        "sample_steps": cfg.grpo_sample_steps,
        "train_steps": train_timesteps(cfg.grpo_sample_steps, cfg.grpo_timestep_fraction),
        "sampling_batch": max(sample_batch),
        "training_batch": max(train_batch),
        "reference_forward": cfg.grpo_kl_beta > 0,
        "peak_memory_gib": peak,
        "images_per_s": k / iteration,
        "flops_per_iteration": flops,
        "achieved_tflops": flops / iteration / 1e12,
        "mfu": utilisation(flops, iteration, args.peak_tflops),
    }


def flop_members_for(args: argparse.Namespace) -> int:
    """Members in the FLOP-counting pass: the whole group, or 2 (the least a ranking loss takes) when
    checkpointing is on, since counting runs with checkpointing off so that recompute is not counted."""
    if args.flop_members:
        return max(MIN_RANKED, min(args.flop_members, args.group_size))
    return min(MIN_RANKED, args.group_size) if args.gradient_checkpointing else args.group_size


def free_memory(device: torch.device) -> None:
    """Hand the freed model's memory back to the device (nothing to do for host memory)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def guidance_for(spec: ModelSpec, args: argparse.Namespace) -> float:
    """SD3: the classifier-free guidance scale; FLUX.1-dev: its embedded guidance (``sampler.guidance``)."""
    return args.flux_guidance if spec.family is FluxModel else args.sd3_cfg


def run_model(spec: ModelSpec, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """Build one model, run both measurements; an out-of-memory section is recorded, not fatal."""
    guidance = guidance_for(spec, args)
    model = build_model(spec, device, dtype, args.resolution, args.seed, args.shift, guidance)
    tr = start(model, train_config(args))
    members = flop_members_for(args)
    result: dict = {
        "params_total": sum(p.numel() for p in model.transformer.parameters()),
        "params_lora": sum(p.numel() for p in tr.params),
        "image_tokens": image_tokens(spec, args.resolution),
        "text_tokens": spec.text_tokens,
        "flop_count_members": members,
    }
    benches = {"gdro": lambda: bench_gdro(tr, spec, args, members),
               "grpo": lambda: bench_grpo(tr, spec, args, members, guidance)}
    for name, bench in benches.items():
        try:
            result[name] = bench()
        except torch.cuda.OutOfMemoryError as err:
            result[name] = {"error": "out of memory: " + str(err).splitlines()[0]}
            tr.opt.zero_grad(set_to_none=True)
            free_memory(device)
    gdro, grpo = result["gdro"], result["grpo"]
    if "error" not in gdro and "error" not in grpo:
        result["grpo_over_gdro"] = {
            "time": grpo["iteration_s"] / gdro["step_s"],
            "flops": grpo["flops_per_iteration"] / gdro["flops_per_step"],
        }
    else:
        result["grpo_over_gdro"] = None
    benches.clear()
    model = tr = None  # drop the last references before freeing the device's cache
    free_memory(device)
    return result


def notes(args: argparse.Namespace, device: torch.device) -> list[str]:
    out = [
        "gdro.step_s and grpo.iteration_s: median wall-clock seconds after warm-up, with device synchronisation.",
        "GDRO: one call of gdro_core.training.loop.train_step (the step gdro train runs); Flow-GRPO: "
        "gdro_core.training.online_grpo's sample_trajectories and update_policy (one prompt's k images).",
        "Both exclude the text encoders, VAE and reward model. GDRO's one-off offline rollout (an ODE sampling "
        "pass, about grpo.sampling_s per group) is not in its step; Flow-GRPO pays sampling every iteration.",
        f"Flow-GRPO: {args.sample_steps} SDE steps (eta {args.eta}), training on the first "
        f"floor({args.sample_steps} x {args.train_timesteps}) steps in {args.grpo_minibatches} minibatch(es); "
        f"SD3 with CFG (scale {args.sd3_cfg}) in sampling and training, FLUX with its guidance embedding "
        f"({args.flux_guidance}); reference forward for the KL term {'on' if args.kl_beta > 0 else 'off'} "
        f"(kl_beta {args.kl_beta}); sigma schedule: the family's "
        f"({'shift ' + str(args.shift) if args.shift is not None else 'published shift'}).",
        "FLOPs: torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention) on one step with "
        "gradient checkpointing off, i.e. model FLOPs without recompute; counted on flop_count_members members "
        "and scaled to the group (every counted op is linear in the batch).",
        f"mfu = FLOPs / (seconds x {args.peak_tflops} TFLOP/s, --peak-tflops).",
    ]
    if device.type != "cuda":
        out.append("peak_memory_gib is null: torch.cuda.max_memory_allocated exists only on CUDA devices.")
    if args.toy:
        out.append("--toy: 2-layer models with small widths at 64 px in float32; numbers test the script, "
                   "not the hardware.")
    return out


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(report: dict) -> str:
    """A readable summary: one row per model."""
    head = (f"{'model':<14}{'GDRO s':>9}{'peak GiB':>10}{'img/s':>8}{'TFLOP':>9}{'MFU':>7}"
            f"{'GRPO samp s':>13}{'train s':>9}{'total s':>9}{'peak GiB':>10}{'GRPO/GDRO':>11}")
    rows = [head, "-" * len(head)]
    for name, r in report["models"].items():
        g, o, ratio = r["gdro"], r["grpo"], r["grpo_over_gdro"]
        rows.append(
            f"{name:<14}"
            + (f"{'OOM':>53}" if "error" in g else
               f"{g['step_s']:>9.3f}{fmt(g['peak_memory_gib'], '>10.1f'):>10}{g['images_per_s']:>8.2f}"
               f"{g['flops_per_step'] / 1e12:>9.3g}{g['mfu']:>7.1%}")
            + (f"{'OOM':>41}" if "error" in o else
               f"{o['sampling_s']:>13.3f}{o['training_s']:>9.3f}{o['iteration_s']:>9.3f}"
               f"{fmt(o['peak_memory_gib'], '>10.1f'):>10}")
            + f"{fmt(ratio and ratio['time'], '>11.2f'):>11}"
        )
    return "\n".join(rows)




TRAIN = Train()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags named after, and defaulting to, the library's ``train`` / ``model`` / ``sampler`` settings."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("reports/gpu_benchmark.json"))
    p.add_argument("--models", nargs="+", choices=sorted(FULL_SPECS), default=list(FULL_SPECS))
    p.add_argument("--toy", action="store_true", help="2-layer configs at 64 px on CPU in float32 (smoke run)")
    p.add_argument("--device", help="default: cuda, or cpu with --toy")
    p.add_argument("--dtype", choices=get_args(Model.model_fields["dtype"].annotation),
                   help="model.dtype; default: bfloat16, float32 with --toy")
    p.add_argument("--resolution", type=int, help="image side in pixels; default 512, 64 with --toy")
    p.add_argument("--group-size", type=int, default=TRAIN.group_size, help="train.group_size (and grpo_group_size)")
    p.add_argument("--lora-rank", type=int, default=TRAIN.lora.rank, help="train.lora.rank (alpha = rank)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="train.gradient_checkpointing")
    p.add_argument("--optimizer", choices=get_args(Train.model_fields["optimizer"].annotation), default=TRAIN.optimizer,
                   help="train.optimizer")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, help="timed GDRO steps; default 5, 2 with --toy")
    p.add_argument("--grpo-repeats", type=int, help="timed Flow-GRPO iterations; default 3, 1 with --toy")
    p.add_argument("--flop-members", type=int, default=0, help="members in the FLOP count; 0 = automatic")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak of the device (H100 SXM bf16: 989)")
    p.add_argument("--sample-steps", type=int, default=TRAIN.grpo_sample_steps, help="train.grpo_sample_steps")
    p.add_argument("--train-timesteps", type=float, default=0.6,
                   help="train.grpo_timestep_fraction (default: the reference's SD3 configs)")
    p.add_argument("--eta", type=float, default=TRAIN.grpo_eta, help="train.grpo_eta")
    p.add_argument("--clip-range", type=float, default=TRAIN.grpo_clip_range, help="train.grpo_clip_range")
    p.add_argument("--kl-beta", type=float, default=TRAIN.grpo_kl_beta, help="train.grpo_kl_beta")
    p.add_argument("--adv-clip-max", type=float, default=TRAIN.grpo_adv_clip_max, help="train.grpo_adv_clip_max")
    p.add_argument("--grpo-minibatches", type=int, default=1,
                   help="train.grpo_minibatches (default: one optimiser step on the whole group)")
    p.add_argument("--shift", type=float, help="sampler.shift; default: the published scheduler's own")
    p.add_argument("--sd3-cfg", type=float, default=4.5, help="sampler.guidance for SD3 (classifier-free)")
    p.add_argument("--flux-guidance", type=float, default=3.5, help="sampler.guidance for FLUX.1-dev (embedded)")
    p.add_argument("--seed", type=int, default=TRAIN.seed, help="train.seed (also seeds the random weights)")
    args = p.parse_args(argv)
    toy = args.toy
    args.device = args.device or ("cpu" if toy else "cuda")
    args.dtype = args.dtype or ("float32" if toy else "bfloat16")
    args.resolution = args.resolution or (64 if toy else 512)
    args.repeats = args.repeats or (2 if toy else 5)
    args.grpo_repeats = args.grpo_repeats or (1 if toy else 3)
    if toy:
        args.warmup = min(args.warmup, 1)
    return args



def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or use --toy (or --device cpu) for a CPU run")
    specs = TOY_SPECS if args.toy else FULL_SPECS
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "toy": args.toy,
        "torch": torch.__version__,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "notes": notes(args, device),
        "models": {name: run_model(specs[name], args, device, dtype) for name in args.models},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print("\n".join(f"* {n}" for n in report["notes"]))
    print(f"written to {args.out}")
    return report


if __name__ == "__main__":
    main()
