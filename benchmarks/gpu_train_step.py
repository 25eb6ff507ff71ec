"""Cost of one offline GDRO step against one online Flow-GRPO iteration, at full model size.

SD3.5-Medium- and FLUX.1-dev-sized transformers are built from their published configs with random
weights (timing, memory and FLOPs do not depend on the weights), a rank-32 LoRA on the attention
projections, bf16 on a CUDA device. For each model, on one group of k images (default 6) at 512 px:

- GDRO: policy forward + backward on the k members and a reference forward (adapter off, no grad),
  one (t, ε) shared by the group, the Plackett-Luce loss plus the top-1 anchor, an AdamW step.
- Flow-GRPO: sampling the k images with the SDE sampler (forward only, CFG for SD3), then training on
  the first ⌊steps · fraction⌋ denoising steps (policy forward + backward, CFG for SD3 when
  ``--train-cfg``, plus a reference forward for the KL term when ``--kl-beta`` > 0), one AdamW step.

Both leave out the text encoders, the VAE and the reward model, which the two methods share (GDRO
pays them once, offline, at rollout time). Run on a GPU machine::

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from gdro_core.objectives.flow_grpo import gaussian_kl, group_advantages, grpo_loss, sde_step, step_log_prob
from gdro_core.objectives.group_loss import plackett_luce_loss
from gdro_core.objectives.implicit_reward import flow_matching_error, implicit_reward, interpolate
from gdro_core.models.lora import add_lora, reference
from gdro_core.params import Lora, Train
from gdro_core.objectives.timesteps import sample_timesteps

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

VAE_FACTOR = 8  # both families' VAEs downsample 8x
LATENT_CHANNELS = 16  # both families' VAEs have 16 latent channels
FLUX_PACK = 2  # FLUX packs 2x2 latent patches into one 64-channel token
GIB = 2**30
MIN_RANKED = 2  # the fewest members a ranking loss takes
T = TypeVar("T")


@dataclass(frozen=True)
class ModelSpec:
    """One transformer to benchmark; ``text_tokens`` is the length of the text-encoder sequence."""

    name: str
    family: str  # "sd3" or "flux"
    config: dict
    text_tokens: int

    @property
    def text_dim(self) -> int:
        return self.config["joint_attention_dim"]

    @property
    def pooled_dim(self) -> int:
        return self.config["pooled_projection_dim"]


# SD3: 77 CLIP tokens + 256 T5 tokens (the pipeline's default max_sequence_length); FLUX.1-dev: 512 T5 tokens.
FULL_SPECS = {
    "sd3.5-medium": ModelSpec("sd3.5-medium", "sd3", SD3_5_MEDIUM, text_tokens=77 + 256),
    "flux.1-dev": ModelSpec("flux.1-dev", "flux", FLUX_1_DEV, text_tokens=512),
}
TOY_TEXT_TOKENS = 8
TOY_SPECS = {
    "sd3.5-medium": ModelSpec("sd3.5-medium", "sd3", SD3_TOY, text_tokens=TOY_TEXT_TOKENS),
    "flux.1-dev": ModelSpec("flux.1-dev", "flux", FLUX_TOY, text_tokens=TOY_TEXT_TOKENS),
}


@dataclass
class Batch:
    """Inputs for one group: clean latents in the model's own layout, conditioning, rewards (best first)."""

    x0: Tensor
    cond: dict[str, Tensor]
    null_cond: dict[str, Tensor]
    rewards: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)  # FLUX: img_ids, txt_ids, guidance


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
    """Randomly initialised transformer, created directly on ``device`` in ``dtype``."""
    torch.manual_seed(seed)
    cls = SD3Transformer2DModel if spec.family == "sd3" else FluxTransformer2DModel
    with torch.device(device), default_dtype(dtype):
        transformer = cls(**spec.config)
    if any(p.dtype != dtype for p in transformer.parameters()):
        transformer.to(dtype=dtype)
    return transformer


def build_transformer(
    spec: ModelSpec, device: torch.device, dtype: torch.dtype, lora: Lora, gradient_checkpointing: bool, seed: int
) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """The base transformer with a trainable LoRA adapter (peft, through ``add_adapter``); returns its parameters."""
    transformer = build_base(spec, device, dtype, seed)
    params = add_lora(transformer, lora)
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    return transformer, params


def latent_side(resolution: int) -> int:
    if resolution % (VAE_FACTOR * FLUX_PACK):
        raise ValueError(f"--resolution must be a multiple of {VAE_FACTOR * FLUX_PACK}, got {resolution}")
    return resolution // VAE_FACTOR


def image_tokens(spec: ModelSpec, resolution: int) -> int:
    """Image tokens the transformer attends over: (side / patch)² for SD3, (side / 2)² packed for FLUX."""
    side = latent_side(resolution)
    patch = spec.config["patch_size"] if spec.family == "sd3" else FLUX_PACK
    return (side // patch) ** 2


def flux_image_ids(side: int) -> Tensor:
    """FLUX positional ids (tokens, 3): (0, row, col) of each packed 2x2 patch, as FluxPipeline builds them."""
    half = side // FLUX_PACK
    ids = torch.zeros(half, half, 3)
    ids[..., 1] = torch.arange(half)[:, None]
    ids[..., 2] = torch.arange(half)[None, :]
    return ids.reshape(half * half, 3)


def make_batch(
    spec: ModelSpec, members: int, resolution: int, guidance: float, device: torch.device, dtype: torch.dtype,
    gen: torch.Generator,
) -> Batch:
    """Random latents and text embeddings of the right shapes; rewards sorted best first."""
    side = latent_side(resolution)
    if spec.family == "sd3":
        x0 = torch.randn(members, LATENT_CHANNELS, side, side, generator=gen)
    else:
        tokens = (side // FLUX_PACK) ** 2
        x0 = torch.randn(members, tokens, LATENT_CHANNELS * FLUX_PACK**2, generator=gen)

    def text() -> dict[str, Tensor]:
        hidden = torch.randn(members, spec.text_tokens, spec.text_dim, generator=gen)
        pooled = torch.randn(members, spec.pooled_dim, generator=gen)
        return {"encoder_hidden_states": hidden.to(device, dtype), "pooled_projections": pooled.to(device, dtype)}

    extra = {}
    if spec.family == "flux":
        extra = {
            "img_ids": flux_image_ids(side).to(device, dtype),
            "txt_ids": torch.zeros(spec.text_tokens, 3).to(device, dtype),
            "guidance": torch.full((members,), guidance).to(device, dtype),
        }
    rewards = torch.rand(1, members, generator=gen).sort(dim=1, descending=True).values
    return Batch(x0.to(device, dtype), text(), text(), rewards.to(device), extra)


def predict(spec: ModelSpec, transformer: torch.nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor],
            extra: dict[str, Tensor]) -> Tensor:
    """v_θ(x_t, t, c); SD3 takes the timestep in [0, 1000], FLUX takes t in [0, 1] and scales it itself.

    Inputs are cast to the conditioning's dtype, which :func:`make_batch` creates in the model's dtype.
    """
    dtype = cond["encoder_hidden_states"].dtype
    common = {
        "hidden_states": x.to(dtype),
        "encoder_hidden_states": cond["encoder_hidden_states"],
        "pooled_projections": cond["pooled_projections"],
        "return_dict": False,
    }
    if spec.family == "sd3":
        return transformer(**common, timestep=(t * 1000).to(dtype))[0]
    guidance = extra["guidance"][:1].expand(x.shape[0])
    return transformer(**common, timestep=t.to(dtype), img_ids=extra["img_ids"], txt_ids=extra["txt_ids"],
                       guidance=guidance)[0]


def guided_velocity(spec: ModelSpec, transformer: torch.nn.Module, x: Tensor, t: Tensor, batch: Batch,
                    cfg_scale: float | None) -> Tensor:
    """Velocity with classifier-free guidance v_u + w (v_c − v_u) in one doubled batch, or the plain one."""
    if cfg_scale is None:
        return predict(spec, transformer, x, t, batch.cond, batch.extra).float()
    both = {k: torch.cat([batch.cond[k], batch.null_cond[k]]) for k in batch.cond}
    v_c, v_u = predict(spec, transformer, torch.cat([x, x]), torch.cat([t, t]), both, batch.extra).float().chunk(2)
    return v_u + cfg_scale * (v_c - v_u)


# ---------------------------------------------------------------- the two training procedures


def gdro_step(spec: ModelSpec, transformer: torch.nn.Module, opt: torch.optim.Optimizer, batch: Batch, cfg: Train,
              gen: torch.Generator) -> float:
    """One GDRO step on one group: implicit rewards from policy and reference errors at a shared (t, ε)."""
    k = batch.x0.shape[0]
    device = batch.x0.device
    t = sample_timesteps(1, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std, gen).to(device).expand(k)
    noise = torch.randn(batch.x0.shape[1:], generator=gen).to(batch.x0).expand_as(batch.x0)
    x_t, v = interpolate(batch.x0, noise, t)
    err_pol = flow_matching_error(v, predict(spec, transformer, x_t, t, batch.cond, batch.extra)).view(1, k)
    with torch.no_grad(), reference(transformer):
        err_ref = flow_matching_error(v, predict(spec, transformer, x_t, t, batch.cond, batch.extra)).view(1, k)
    s = implicit_reward(err_pol, err_ref, cfg.beta)
    loss = plackett_luce_loss(s, batch.rewards, cfg.tau, cfg.positions or None) + cfg.gamma * err_pol[:, 0].mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


@dataclass(frozen=True)
class GrpoSettings:
    """Flow-GRPO knobs (defaults of the reference config/base.py and its SD3 configs)."""

    sample_steps: int
    train_fraction: float
    eta: float
    clip_range: float
    kl_beta: float
    adv_eps: float
    adv_clip_max: float
    shift: float
    cfg_scale: float | None  # sampling CFG; None for guidance-distilled FLUX
    train_cfg: bool

    @property
    def train_steps(self) -> int:
        """⌊steps · fraction⌋, as the reference's num_train_timesteps."""
        return int(self.sample_steps * self.train_fraction)


def sigma_schedule(steps: int, shift: float) -> Tensor:
    """σ_0 = 1 > ... > σ_steps = 0, the shifted FlowMatch Euler schedule the samplers use."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.float()


@dataclass
class Trajectory:
    """Per sampling step j: the state x_j, the sampled x_{j+1} and log π_old(x_{j+1} | x_j)."""

    states: list[Tensor]
    next_states: list[Tensor]
    log_probs: list[Tensor]


@torch.no_grad()
def grpo_sample(spec: ModelSpec, transformer: torch.nn.Module, batch: Batch, sigmas: Tensor, s: GrpoSettings,
                gen: torch.Generator) -> Trajectory:
    """k images from noise by the SDE sampler, keeping each step's state and its log-probability."""
    k = batch.x0.shape[0]
    x = torch.randn(batch.x0.shape, generator=gen).to(batch.x0.device, torch.float32)
    traj = Trajectory([], [], [])
    for i in range(s.sample_steps):
        t = sigmas[i].to(x.device).expand(k)
        v = guided_velocity(spec, transformer, x, t, batch, s.cfg_scale)
        noise = torch.randn(x.shape, generator=gen).to(x)
        x_next, mean, std = sde_step(x, v, sigmas[i], sigmas[i + 1], s.eta, noise=noise, sigma_max=sigmas[1])
        traj.states.append(x)
        traj.next_states.append(x_next)
        traj.log_probs.append(step_log_prob(x_next, mean, std))
        x = x_next
    return traj


def grpo_train_step(spec: ModelSpec, transformer: torch.nn.Module, batch: Batch, traj: Trajectory, j: int,
                    advantages: Tensor, sigmas: Tensor, s: GrpoSettings) -> Tensor:
    """Clipped-ratio loss on denoising step j (plus β_KL · KL to the reference), backpropagated."""
    k = batch.x0.shape[0]
    x = traj.states[j]
    t = sigmas[j].to(x.device).expand(k)
    cfg = s.cfg_scale if s.train_cfg else None
    zeros = torch.zeros_like(x)
    v = guided_velocity(spec, transformer, x, t, batch, cfg)
    _, mean, std = sde_step(x, v, sigmas[j], sigmas[j + 1], s.eta, noise=zeros, sigma_max=sigmas[1])
    log_prob = step_log_prob(traj.next_states[j], mean, std)
    kl = None
    if s.kl_beta > 0:
        with torch.no_grad(), reference(transformer):
            v_ref = guided_velocity(spec, transformer, x, t, batch, cfg)
        _, ref_mean, _ = sde_step(x, v_ref, sigmas[j], sigmas[j + 1], s.eta, noise=zeros, sigma_max=sigmas[1])
        kl = gaussian_kl(mean, ref_mean, std)
    loss = grpo_loss(log_prob, traj.log_probs[j], advantages, s.clip_range, kl, s.kl_beta, s.adv_clip_max)
    loss.backward()
    return loss.detach()


def grpo_train(spec: ModelSpec, transformer: torch.nn.Module, opt: torch.optim.Optimizer, batch: Batch,
               traj: Trajectory, sigmas: Tensor, s: GrpoSettings) -> None:
    """Gradients accumulated over the first ``train_steps`` denoising steps, then one optimizer step."""
    advantages = group_advantages(batch.rewards, s.adv_eps).flatten()
    for j in range(s.train_steps):
        grpo_train_step(spec, transformer, batch, traj, j, advantages, sigmas, s)
    opt.step()
    opt.zero_grad(set_to_none=True)


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


def bench_gdro(
    spec: ModelSpec, transformer: torch.nn.Module, opt: torch.optim.Optimizer, args: argparse.Namespace,
    device: torch.device, dtype: torch.dtype, flop_members: int,
) -> dict:
    """(a) Median GDRO step time, peak memory, images/s, FLOPs and MFU on one group."""
    gen = torch.Generator().manual_seed(args.seed)
    cfg = Train()
    batch = make_batch(spec, args.group_size, args.resolution, args.flux_guidance, device, dtype, gen)
    reset_peak(device)
    times = repeat_timed(lambda: gdro_step(spec, transformer, opt, batch, cfg, gen), device, args.warmup, args.repeats)
    peak = peak_gib(device)
    small = make_batch(spec, flop_members, args.resolution, args.flux_guidance, device, dtype, gen)
    with checkpointing_off(transformer):
        flops = count_flops(lambda: gdro_step(spec, transformer, opt, small, cfg, gen)) * args.group_size / flop_members
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


def bench_grpo(
    spec: ModelSpec, transformer: torch.nn.Module, opt: torch.optim.Optimizer, args: argparse.Namespace,
    device: torch.device, dtype: torch.dtype, flop_members: int,
) -> dict:
    """(b) One Flow-GRPO iteration producing the same k trained samples: SDE sampling, then training."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    s = GrpoSettings(
        sample_steps=args.sample_steps, train_fraction=args.train_timesteps, eta=args.eta,
        clip_range=args.clip_range, kl_beta=args.kl_beta, adv_eps=args.adv_eps, adv_clip_max=args.adv_clip_max,
        shift=args.shift, cfg_scale=args.sd3_cfg if spec.family == "sd3" else None, train_cfg=args.train_cfg,
    )
    if s.train_steps < 1:
        raise ValueError("--train-timesteps × --sample-steps must leave at least one step to train on")
    sigmas = sigma_schedule(s.sample_steps, s.shift)
    batch = make_batch(spec, args.group_size, args.resolution, args.flux_guidance, device, dtype, gen)
    reset_peak(device)
    sampling, training = [], []
    for i in range(args.warmup + args.grpo_repeats):
        t_sample, traj = timed(lambda: grpo_sample(spec, transformer, batch, sigmas, s, gen), device)
        t_train, _ = timed(lambda: grpo_train(spec, transformer, opt, batch, traj, sigmas, s), device)
        if i >= args.warmup:
            sampling.append(t_sample)
            training.append(t_train)
    peak = peak_gib(device)
    # FLOPs: one sampling step (full group) × steps, one training step (flop_members, scaled) × train steps
    one = replace(s, sample_steps=1)
    sample_flops = count_flops(lambda: grpo_sample(spec, transformer, batch, sigmas, one, gen))
    small = make_batch(spec, flop_members, args.resolution, args.flux_guidance, device, dtype, gen)
    small_traj = grpo_sample(spec, transformer, small, sigmas, one, gen)
    adv = group_advantages(small.rewards, s.adv_eps).flatten()
    with checkpointing_off(transformer):
        train_flops = count_flops(lambda: grpo_train_step(spec, transformer, small, small_traj, 0, adv, sigmas, s))
    opt.zero_grad(set_to_none=True)
    flops = sample_flops * s.sample_steps + train_flops * args.group_size / flop_members * s.train_steps
    total = [a + b for a, b in zip(sampling, training)]
    iteration = statistics.median(total)
    return {
        "sampling_s": statistics.median(sampling),
        "training_s": statistics.median(training),
        "iteration_s": iteration,
        "iteration_s_all": total,
        "sample_steps": s.sample_steps,
        "train_steps": s.train_steps,
        "sampling_batch": args.group_size * (2 if s.cfg_scale is not None else 1),
        "training_batch": args.group_size * (2 if s.cfg_scale is not None and s.train_cfg else 1),
        "reference_forward": s.kl_beta > 0,
        "peak_memory_gib": peak,
        "images_per_s": args.group_size / iteration,
        "flops_per_iteration": flops,
        "achieved_tflops": flops / iteration / 1e12,
        "mfu": utilisation(flops, iteration, args.peak_tflops),
    }


def flop_members_for(args: argparse.Namespace) -> int:
    """Members in the FLOP-counting pass: the whole group, or 2 (the least a ranking loss takes) when
    checkpointing is on, since counting runs with checkpointing off so that recompute is not counted."""
    if args.flop_members:
        return min(args.flop_members, args.group_size)
    return min(MIN_RANKED, args.group_size) if args.gradient_checkpointing else args.group_size


def free_memory(device: torch.device) -> None:
    """Hand the freed model's memory back to the device (nothing to do for host memory)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def run_model(spec: ModelSpec, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """Build one transformer, run both measurements; an out-of-memory section is recorded, not fatal."""
    lora = Lora(rank=args.lora_rank, alpha=float(args.lora_rank))
    transformer, params = build_transformer(spec, device, dtype, lora, args.gradient_checkpointing, args.seed)
    opt = torch.optim.AdamW(params, lr=Train().lr)
    members = flop_members_for(args)
    result: dict = {
        "params_total": sum(p.numel() for p in transformer.parameters()),
        "params_lora": sum(p.numel() for p in params),
        "image_tokens": image_tokens(spec, args.resolution),
        "text_tokens": spec.text_tokens,
        "flop_count_members": members,
    }
    for name, bench in (("gdro", bench_gdro), ("grpo", bench_grpo)):
        try:
            result[name] = bench(spec, transformer, opt, args, device, dtype, members)
        except torch.cuda.OutOfMemoryError as err:
            result[name] = {"error": "out of memory: " + str(err).splitlines()[0]}
            opt.zero_grad(set_to_none=True)
            free_memory(device)
    gdro, grpo = result["gdro"], result["grpo"]
    if "error" not in gdro and "error" not in grpo:
        result["grpo_over_gdro"] = {
            "time": grpo["iteration_s"] / gdro["step_s"],
            "flops": grpo["flops_per_iteration"] / gdro["flops_per_step"],
        }
    else:
        result["grpo_over_gdro"] = None
    del transformer, params, opt
    free_memory(device)
    return result



def notes(args: argparse.Namespace, device: torch.device) -> list[str]:
    out = [
        "gdro.step_s and grpo.iteration_s: median wall-clock seconds after warm-up, with device synchronisation.",
        "Both exclude the text encoders, VAE and reward model. GDRO's one-off offline rollout (an ODE sampling "
        "pass, about grpo.sampling_s per group) is not in its step; Flow-GRPO pays sampling every iteration.",
        f"Flow-GRPO: {args.sample_steps} SDE steps (eta {args.eta}), training on the first "
        f"floor({args.sample_steps} x {args.train_timesteps}) steps; SD3 with CFG (scale {args.sd3_cfg}) in "
        f"sampling{' and training' if args.train_cfg else ''}, FLUX with its guidance embedding; "
        f"reference forward for the KL term {'on' if args.kl_beta > 0 else 'off'} (kl_beta {args.kl_beta}).",
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("reports/gpu_benchmark.json"))
    p.add_argument("--models", nargs="+", choices=sorted(FULL_SPECS), default=list(FULL_SPECS))
    p.add_argument("--toy", action="store_true", help="2-layer configs at 64 px on CPU in float32 (smoke run)")
    p.add_argument("--device", help="default: cuda, or cpu with --toy")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: bfloat16, float32 with --toy")
    p.add_argument("--resolution", type=int, help="image side in pixels; default 512, 64 with --toy")
    p.add_argument("--group-size", type=int, default=6)
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, help="timed GDRO steps; default 5, 2 with --toy")
    p.add_argument("--grpo-repeats", type=int, help="timed Flow-GRPO iterations; default 3, 1 with --toy")
    p.add_argument("--flop-members", type=int, default=0, help="members in the FLOP count; 0 = automatic")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak of the device (H100 SXM bf16: 989)")
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--train-timesteps", type=float, default=0.6, help="fraction of the sampling steps trained on")
    p.add_argument("--eta", type=float, default=0.7, help="Flow-GRPO noise level")
    p.add_argument("--clip-range", type=float, default=1e-4)
    p.add_argument("--kl-beta", type=float, default=0.04)
    p.add_argument("--adv-eps", type=float, default=1e-4)
    p.add_argument("--adv-clip-max", type=float, default=5.0)
    p.add_argument("--shift", type=float, default=3.0, help="sigma-schedule shift")
    p.add_argument("--sd3-cfg", type=float, default=4.5, help="SD3 classifier-free guidance scale")
    p.add_argument("--flux-guidance", type=float, default=3.5, help="FLUX.1-dev guidance embedding")
    p.add_argument("--train-cfg", action=argparse.BooleanOptionalAction, default=True,
                   help="Flow-GRPO trains SD3 through the CFG combination (reference train.cfg)")
    p.add_argument("--seed", type=int, default=0)
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
