"""Flow-GRPO baseline math against direct Gaussian densities, hand values and a Gaussian toy flow."""

import math

import pytest
import torch

from gdro_core.objectives.flow_grpo import gaussian_kl, group_advantages, grpo_loss, sde_step, step_log_prob


def test_step_log_prob_is_the_gaussian_density_averaged_over_elements():
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 2, 4, 4, generator=gen)
    std = torch.tensor([0.3, 1.0, 2.5]).view(3, 1, 1, 1)
    x = mean + std * torch.randn(mean.shape, generator=gen)
    expected = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x).flatten(1).mean(1)
    assert torch.allclose(step_log_prob(x, mean, std), expected, atol=1e-5)
    # one element by hand: -(x-m)^2/(2s^2) - log s - log sqrt(2 pi)
    one = step_log_prob(torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([2.0]))
    assert one.item() == pytest.approx(-0.25 / 8 - math.log(2.0) - 0.5 * math.log(2 * math.pi), abs=1e-6)


def test_eta_zero_is_the_euler_ode_step():
    gen = torch.Generator().manual_seed(1)
    x, v = torch.randn(4, 3, 5, 5, generator=gen), torch.randn(4, 3, 5, 5, generator=gen)
    sigma, sigma_next = torch.tensor([0.9, 0.7, 0.5, 0.2]), torch.tensor([0.8, 0.5, 0.3, 0.0])
    x_next, mean, std = sde_step(x, v, sigma, sigma_next, eta=0.0, generator=gen)
    euler = x + (sigma_next - sigma).view(-1, 1, 1, 1) * v
    assert torch.allclose(x_next, euler, atol=1e-6)
    assert torch.allclose(mean, euler, atol=1e-6)
    assert torch.all(std == 0)


def test_step_matches_the_reference_formula_by_hand():
    # sigma = 0.6, sigma_next = 0.5, eta = 0.7: s_t^2 = 0.49 * 0.6 / 0.4 = 0.735, dt = -0.1
    x, v = torch.tensor([[2.0]]), torch.tensor([[-1.0]])
    _, mean, std = sde_step(x, v, 0.6, 0.5, eta=0.7, noise=torch.zeros(1, 1))
    s2, dt = 0.735, -0.1
    expected_mean = 2.0 * (1 + s2 / 1.2 * dt) - 1.0 * (1 + s2 * 0.4 / 1.2) * dt
    assert mean.item() == pytest.approx(expected_mean, abs=1e-6)
    assert std.item() == pytest.approx(math.sqrt(s2 * 0.1), abs=1e-6)


def test_sigma_one_uses_the_schedule_second_sigma_like_the_reference():
    x, v = torch.ones(2, 1), torch.zeros(2, 1)
    _, _, std = sde_step(x, v, 1.0, 0.9, eta=0.5, noise=torch.zeros(2, 1))
    # s_t = eta * sqrt(1 / (1 - sigmas[1])), std = s_t * sqrt(0.1)
    assert torch.allclose(std.flatten(), torch.full((2,), 0.5 * math.sqrt(1 / 0.1) * math.sqrt(0.1)))
    _, _, std_explicit = sde_step(x, v, 1.0, 0.9, eta=0.5, noise=torch.zeros(2, 1), sigma_max=0.8)
    assert std_explicit.flatten()[0].item() == pytest.approx(0.5 * math.sqrt(1 / 0.2) * math.sqrt(0.1), abs=1e-6)
    assert torch.isfinite(std).all()


def test_given_noise_replays_the_step_and_samples_have_mean_and_std():
    gen = torch.Generator().manual_seed(2)
    x, v = torch.randn(2, 3, generator=gen), torch.randn(2, 3, generator=gen)
    noise = torch.randn(2, 3, generator=gen)
    x_next, mean, std = sde_step(x, v, 0.7, 0.6, eta=0.7, noise=noise)
    assert torch.allclose(x_next, mean + std * noise)
    # many draws of one state: empirical mean and std of the step match (mean, std)
    n = 40000
    xs, vs = x[:1].expand(n, 3), v[:1].expand(n, 3)
    draws, mean, std = sde_step(xs, vs, 0.7, 0.6, eta=0.7, generator=gen)
    assert torch.allclose(draws.mean(0), mean[0], atol=4 * std[0].item() / math.sqrt(n))
    assert torch.allclose(draws.std(0), std[0].expand(3), rtol=0.02)


def test_sde_keeps_the_ode_marginals_of_a_gaussian_flow():
    # x0 ~ N(0, s0^2): x_sigma has variance (1 - sigma)^2 s0^2 + sigma^2 and the exact velocity
    # E[eps - x0 | x] = (sigma - (1 - sigma) s0^2) x / Var(x_sigma); the SDE must track those variances.
    s0, n, steps, eta = 0.5, 20000, 200, 0.7
    sigmas = torch.linspace(1, 0, steps + 1)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, 1, generator=gen)
    checked = 0
    for i in range(steps):
        s, s_next = sigmas[i].item(), sigmas[i + 1].item()
        var = (1 - s) ** 2 * s0**2 + s**2
        x, _, _ = sde_step(x, (s - (1 - s) * s0**2) * x / var, s, s_next, eta, generator=gen)
        if i + 1 in (steps // 2, steps):
            assert x.var().item() == pytest.approx((1 - s_next) ** 2 * s0**2 + s_next**2, rel=0.04)
            checked += 1
    assert checked == 2


def test_group_advantages_are_standardised_within_groups():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, 0.9, 0.1]])
    adv = group_advantages(rewards, eps=1e-8)
    assert torch.allclose(adv.mean(1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(adv.std(1, unbiased=False), torch.ones(2), atol=1e-6)
    # first group by hand: mean 3, population std sqrt(3.5)
    assert torch.allclose(adv[0], (rewards[0] - 3.0) / math.sqrt(3.5), atol=1e-6)
    # equal rewards give zero advantage, not a division by zero
    assert torch.all(group_advantages(torch.full((1, 3), 0.7), eps=1e-4) == 0)
    # global std: group means, one std over all rewards
    glob = group_advantages(rewards, eps=0.0, global_std=True)
    assert torch.allclose(glob, (rewards - rewards.mean(1, keepdim=True)) / rewards.std(unbiased=False))


def test_grpo_loss_at_ratio_one_is_minus_mean_advantage():
    log_prob = torch.tensor([-1.2, 0.3, 2.0, -0.4])
    adv = torch.tensor([1.5, -0.5, 0.2, -1.0])
    assert grpo_loss(log_prob, log_prob.clone(), adv, clip_range=1e-4).item() == pytest.approx(-adv.mean().item())
    kl = torch.tensor([0.2, 0.4, 0.0, 0.2])
    with_kl = grpo_loss(log_prob, log_prob.clone(), adv, clip_range=1e-4, kl=kl, kl_beta=0.5)
    assert with_kl.item() == pytest.approx(-adv.mean().item() + 0.5 * 0.2)
    clamped = grpo_loss(log_prob, log_prob.clone(), torch.tensor([9.0, -9.0, 1.0, 0.0]), 1e-4, adv_clip_max=5.0)
    assert clamped.item() == pytest.approx(-(5.0 - 5.0 + 1.0 + 0.0) / 4)


def test_clipping_stops_the_gradient_beyond_the_trust_region():
    old = torch.zeros(2)
    adv = torch.tensor([1.0, 1.0])
    # ratio e^1 >> 1 + 0.2 with positive advantage: clipped branch is active, no gradient
    log_prob = torch.tensor([1.0, 0.05], requires_grad=True)
    grpo_loss(log_prob, old, adv, clip_range=0.2).backward()
    assert log_prob.grad[0].item() == 0.0
    # inside the region the gradient is -A * ratio / n
    assert log_prob.grad[1].item() == pytest.approx(-math.exp(0.05) / 2, abs=1e-6)
    # ratio far above 1 + clip with a negative advantage is not clipped (the pessimistic bound keeps it)
    log_prob = torch.tensor([1.0], requires_grad=True)
    grpo_loss(log_prob, torch.zeros(1), torch.tensor([-1.0]), clip_range=0.2).backward()
    assert log_prob.grad.item() == pytest.approx(math.exp(1.0), abs=1e-5)


def test_gaussian_kl_is_zero_for_equal_means_and_matches_hand_value():
    mean = torch.randn(2, 3, 4)
    assert torch.all(gaussian_kl(mean, mean.clone(), torch.tensor([0.3, 2.0])) == 0)
    a = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])
    b = torch.tensor([[[0.0, 0.0], [0.0, 3.0]]])
    # squared differences 1, 4, 0, 9: mean 3.5, over 2 * 0.5^2
    assert gaussian_kl(a, b, 0.5).item() == pytest.approx(3.5 / 0.5, abs=1e-6)
    # equals the elementwise torch KL between the two Gaussians, averaged
    std = torch.tensor([0.7]).view(1, 1, 1)
    direct = torch.distributions.kl_divergence(
        torch.distributions.Normal(a, std.expand_as(a)), torch.distributions.Normal(b, std.expand_as(b))
    ).flatten(1).mean(1)
    assert torch.allclose(gaussian_kl(a, b, std), direct, atol=1e-6)
