"""The online Flow-GRPO loop: trajectories, the loss at ratio 1, training moves the LoRA, exact resume."""

import numpy as np
import pytest
import torch

from gdro_core.models.builtin import BuiltinModelAdapter, build_builtin_pipeline
from gdro_core.models.families import add_lora
from gdro_core.models.lora import lora_state, reference
from gdro_core.objectives.flow_grpo import group_advantages, sde_step
from gdro_core.tasks.ocr.prompts import OcrPrompt
from gdro_core.training.online_grpo import (
    ADV_EPS,
    encode_prompts,
    guided_velocity,
    sample_trajectories,
    sigma_schedule,
    step_loss,
    train_online,
    train_timesteps,
)

PROMPTS = [OcrPrompt(f'a sign that says "{t}"', t) for t in ("123", "456", "789")]
GUIDANCE = 3.0
GRPO = {"grpo_prompts_per_iteration": 2, "grpo_group_size": 3, "grpo_sample_steps": 3, "grpo_timestep_fraction": 0.67,
        "grpo_minibatches": 2, "grpo_kl_beta": 0.04, "steps": 2, "checkpoint_every": 1, "lr": 1e-3}


def _params(tiny_params, **update):
    return tiny_params.model_copy(update={"train": tiny_params.train.model_copy(update={**GRPO, **update})})


def _model(p):
    pipe = build_builtin_pipeline(p.model.builtin, p.image_shape, p.sampler.shift, seed=0)
    return BuiltinModelAdapter(pipe, (p.world.height, p.world.width))


def brightness(images, targets):
    """A deterministic stand-in for the OCR reward: mean pixel value in [0, 1]."""
    assert len(images) == len(targets)
    return [float(np.asarray(im, dtype=np.float32).mean() / 255) for im in images]


def test_trajectories_chain_their_states_and_start_from_sigma_one(tiny_params):
    p = _params(tiny_params)
    model = _model(p)
    cond, null = encode_prompts(model, PROMPTS, batch_size=2)
    assert cond["pooled_projections"].shape[0] == len(PROMPTS)
    sigmas = sigma_schedule(model, 3)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and len(sigmas) == 4
    traj = sample_trajectories(model, cond, null, sigmas, 0.7, GUIDANCE, torch.Generator().manual_seed(0))
    assert traj.states.shape == (3, 3, 1, p.world.height, p.world.width) and traj.log_probs.shape == (3, 3)
    assert torch.equal(traj.states[1:], traj.next_states[:-1])
    assert torch.isfinite(traj.log_probs).all()
    assert train_timesteps(3, 0.67) == 2 and train_timesteps(10, 0.01) == 1


def test_loss_at_ratio_one_is_minus_mean_advantage_plus_beta_kl(tiny_params):
    """Fresh rollouts of the current policy: ρ = 1, nothing clipped, L = −mean(A) + β_KL · mean(KL)."""
    p = _params(tiny_params)
    model = _model(p)
    add_lora(model.transformer, p.train.lora)
    with torch.no_grad():  # move the policy away from the reference, so the KL is not zero
        for n, q in model.transformer.named_parameters():
            if "lora_B" in n:
                q.add_(0.05 * torch.randn(q.shape, generator=torch.Generator().manual_seed(len(n))))
    cond, null = encode_prompts(model, PROMPTS, batch_size=8)
    rows = torch.tensor([0, 0, 0, 2, 2, 2])
    batch = {k: v[rows] for k, v in cond.items()}
    sigmas = sigma_schedule(model, 3)
    traj = sample_trajectories(model, batch, null, sigmas, p.train.grpo_eta, GUIDANCE, torch.Generator().manual_seed(1))
    rewards = torch.tensor([0.2, 0.9, 0.5, 0.1, 0.1, 0.7])
    adv = group_advantages(rewards.view(2, 3), ADV_EPS, p.train.grpo_global_std).flatten()
    idx = torch.tensor([1, 2, 5])  # the better members: mean(A) > 0
    assert adv[idx].mean() > 0.5
    j = 1
    loss, parts = step_loss(model, traj, j, idx, batch, null, adv, sigmas, p.train, GUIDANCE)
    assert parts["clip_fraction"] == 0.0 and parts["abs_log_ratio"] < 1e-4

    # the KL by hand: N(μ_θ, σ_t²) against N(μ_ref, σ_t²), per element, averaged
    x, c = traj.states[j, idx], {k: v[idx] for k, v in batch.items()}
    zeros = torch.zeros_like(x)
    with torch.no_grad():
        _, mu, std = sde_step(x, guided_velocity(model, x, sigmas[j], c, null, GUIDANCE), sigmas[j], sigmas[j + 1],
                              p.train.grpo_eta, noise=zeros, sigma_max=sigmas[1])
        with reference(model.transformer):
            _, mu_ref, _ = sde_step(x, guided_velocity(model, x, sigmas[j], c, null, GUIDANCE), sigmas[j],
                                    sigmas[j + 1], p.train.grpo_eta, noise=zeros, sigma_max=sigmas[1])
    sigma_t = (std / (sigmas[j] - sigmas[j + 1]).sqrt()).expand_as(mu)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mu, sigma_t),
                                           torch.distributions.Normal(mu_ref, sigma_t)).flatten(1).mean(1)
    assert kl.mean() > 0 and parts["kl"] == pytest.approx(float(kl.mean()), rel=1e-4)
    expected = -float(adv[idx].mean()) + p.train.grpo_kl_beta * float(kl.mean())
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)

    no_kl = p.train.model_copy(update={"grpo_kl_beta": 0.0})
    loss0, _ = step_loss(model, traj, j, idx, batch, null, adv, sigmas, no_kl, GUIDANCE)
    assert loss0.item() == pytest.approx(-float(adv[idx].mean()), rel=1e-5)
    loss0.backward()
    grads = [q.grad for n, q in model.transformer.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_two_iterations_train_the_lora_and_log_loss_reward_kl_and_clipping(tiny_params, tmp_path):
    p = _params(tiny_params)
    model = _model(p)
    cond, null = encode_prompts(model, PROMPTS, batch_size=8)
    logs, checkpoints, seen = [], [], []

    def reward(images, targets):
        seen.append(list(targets))
        return brightness(images, targets)

    weights = train_online(model, PROMPTS, cond, null, reward, p.train, tmp_path, lambda s, m: logs.append((s, m)),
                           on_checkpoint=lambda s, w: checkpoints.append(s), eval_every=1, guidance=GUIDANCE)
    assert [s for s, _ in logs] == [1, 2] and checkpoints == [1, 2]
    for _, m in logs:
        for key in ("train/loss", "train/reward", "train/kl", "train/clip_fraction", "train/grad_norm",
                    "time/generation_s", "time/scoring_s", "time/training_s"):
            assert np.isfinite(m[key]), key
        assert 0.0 <= m["train/clip_fraction"] <= 1.0 and m["train/kl"] >= 0.0
    # k = 3 images per prompt, 2 prompts per iteration, each group one prompt's target
    assert all(len(t) == 6 and t[0] == t[1] == t[2] and t[3] == t[4] == t[5] for t in seen)
    assert len(seen) == 2
    # after the first optimiser step the policy is off the sampling policy: ratios move and the KL is positive
    assert logs[-1][1]["train/kl"] > 0 and logs[-1][1]["train/abs_log_ratio"] > 0
    b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert b and any(v.abs().sum() > 0 for v in b.values())  # B starts at zero
    live = lora_state(model.transformer)
    assert all(torch.equal(live[k], weights[k]) for k in weights)  # the EMA is what the model ends with


def test_interrupted_online_training_resumes_to_the_same_weights(tiny_params, tmp_path):
    p = _params(tiny_params)

    def run(cfg, ckpt, logs):
        model = _model(p)
        cond, null = encode_prompts(model, PROMPTS, batch_size=8)
        return train_online(model, PROMPTS, cond, null, brightness, cfg, ckpt, lambda s, m: logs.append(s),
                            guidance=GUIDANCE)

    full = run(p.train, tmp_path / "a", [])
    run(p.train.model_copy(update={"steps": 1}), tmp_path / "b", [])
    resumed_logs = []
    resumed = run(p.train, tmp_path / "b", resumed_logs)
    assert resumed_logs == [2]  # picked up after the iteration-1 checkpoint
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.allclose(full[k], resumed[k], atol=1e-6), k


def test_conditioning_that_does_not_match_the_prompts_is_rejected(tiny_params, tmp_path):
    p = _params(tiny_params)
    model = _model(p)
    cond, null = encode_prompts(model, PROMPTS[:2], batch_size=8)
    with pytest.raises(ValueError, match="rows for 3 prompts"):
        train_online(model, PROMPTS, cond, null, brightness, p.train, tmp_path, lambda s, m: None, guidance=GUIDANCE)
