"""The DPO baselines as their papers define them, tie dropping, best-vs-worst-of-N pairs and prior noise."""

import math

import pytest
import torch

from gdro_core.data.rollout import image_seed
from gdro_core.models.builtin import BuiltinModelAdapter, build_builtin_pipeline
from gdro_core.models.families import add_lora
from gdro_core.models.sampling import initial_noise
from gdro_core.objectives.group_loss import dpo_loss
from gdro_core.objectives.implicit_reward import velocity_norm_ratio
from gdro_core.objectives.offline import (
    anchor_weight,
    best_worst_of_pool,
    draw_members,
    draw_randomness,
    group_objective,
    prior_noise,
    seed_matrix,
)


def _cfg(p, **update):
    return p.train.model_copy(update=update)


def test_dpo_loss_matches_hand_value_and_drops_masked_pairs():
    s_w, s_l = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 5.0])
    # -log σ(1) = log(1 + e^-1); the other two pairs are dropped
    kept = dpo_loss(s_w, s_l, keep=torch.tensor([True, False, False]))
    assert kept.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    every = dpo_loss(s_w, s_l)
    expected = (math.log(1 + math.exp(-1)) + math.log(2) + math.log(1 + math.exp(3))) / 3
    assert every.item() == pytest.approx(expected, abs=1e-6)


def test_dpo_loss_with_every_pair_dropped_is_zero_with_zero_gradient():
    s_w = torch.tensor([0.3, -0.2], requires_grad=True)
    loss = dpo_loss(s_w, torch.zeros(2), keep=torch.tensor([False, False]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s_w.grad, torch.zeros(2))


def test_dpo_loss_equals_official_convention_with_beta_dpo_twice_beta():
    """Official Diffusion-DPO: −logσ(−0.5·beta_dpo·(model_diff − ref_diff)), errors as means over elements."""
    beta = 12.0
    e_pol_w, e_pol_l, e_ref_w, e_ref_l = 0.40, 0.55, 0.45, 0.50
    s_w, s_l = -beta * (e_pol_w - e_ref_w), -beta * (e_pol_l - e_ref_l)
    official = -torch.nn.functional.logsigmoid(torch.tensor(-0.5 * (2 * beta) * ((e_pol_w - e_pol_l) - (e_ref_w - e_ref_l))))
    assert dpo_loss(torch.tensor([s_w]), torch.tensor([s_l])).item() == pytest.approx(official.item(), abs=1e-6)


def test_anchor_weights_per_objective(tiny_params):
    p = tiny_params
    assert anchor_weight(_cfg(p, objective="dpo", gamma=0.7)) == 0.0
    assert anchor_weight(_cfg(p, objective="offline_dpo", gamma=0.7)) == 0.0
    assert anchor_weight(_cfg(p, objective="dpo_anchor", gamma=0.7)) == 0.7
    assert anchor_weight(_cfg(p, objective="gdro", gamma=0.7)) == 0.7
    assert anchor_weight(_cfg(p, objective="sft_best", gamma=0.7)) == 1.0


def test_best_worst_of_pool_skips_tied_pools_and_picks_the_extremes():
    rewards = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.1, 0.9, 0.4, 0.2], [1.0, 0.0, 0.3, 0.3]])
    prompts, members = best_worst_of_pool(rewards, 50, torch.Generator().manual_seed(0))
    assert set(prompts.tolist()) == {1, 2}  # prompt 0's pool is all tied: no preference
    for pr, (best, worst) in zip(prompts.tolist(), members.tolist()):
        assert rewards[pr, best] == rewards[pr].max() and rewards[pr, worst] == rewards[pr].min()


def test_best_worst_of_pool_without_replacement_when_enough_prompts():
    rewards = torch.rand(10, 4, generator=torch.Generator().manual_seed(1))
    prompts, _ = best_worst_of_pool(rewards, 6, torch.Generator().manual_seed(0))
    assert len(set(prompts.tolist())) == 6


def test_best_worst_of_pool_with_every_pool_tied_is_an_error():
    with pytest.raises(ValueError, match="equal rewards"):
        best_worst_of_pool(torch.full((3, 4), 0.5), 2, torch.Generator())


def test_draw_members_uses_pool_extremes_only_for_offline_dpo(tiny_params):
    rewards = torch.rand(5, 8, generator=torch.Generator().manual_seed(2))
    _, members = draw_members(rewards, _cfg(tiny_params, objective="offline_dpo"), torch.Generator().manual_seed(0))
    assert members.shape[1] == 2
    cfg = _cfg(tiny_params, objective="dpo")
    _, members = draw_members(rewards, cfg, torch.Generator().manual_seed(0))
    assert members.shape[1] == cfg.group_size


def _model(p):
    pipe = build_builtin_pipeline(p.model.builtin, p.image_shape, p.sampler.shift, seed=0)
    return BuiltinModelAdapter(pipe, (p.world.height, p.world.width))


@pytest.mark.parametrize("objective", ["dpo", "dpo_anchor", "offline_dpo"])
def test_tied_pairs_are_dropped_from_the_dpo_loss(tiny_params, one_thread, objective):
    """Group 0 is tied (best == worst): only group 1's pair counts, so the fresh-adapter loss is still log 2."""
    p = tiny_params
    model = _model(p)
    add_lora(model.transformer, p.train.lora)
    x0 = torch.randn(2, 3, 1, p.world.height, p.world.width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = model.encode(['a "111"', 'a "222"'])
    rewards = torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.2, 0.6]])
    loss, parts = group_objective(model, x0, cond, rewards, _cfg(p, objective=objective), torch.Generator().manual_seed(0))
    assert parts["pairs_kept"] == 0.5
    assert parts["loss_main"] == pytest.approx(math.log(2), abs=1e-5)
    all_tied = torch.full((2, 3), 0.5)
    _, parts = group_objective(model, x0, cond, all_tied, _cfg(p, objective=objective), torch.Generator().manual_seed(0))
    assert parts["pairs_kept"] == 0.0 and parts["loss_main"] == 0.0
    assert parts["velocity_norm_ratio"] == pytest.approx(1.0, abs=1e-6)  # fresh adapter: policy == reference


def test_seed_matrix_and_prior_noise_regenerate_each_images_sampler_noise():
    rows = [{"prompt_index": i, "member": m, "seed": image_seed(7, i, m, 3)} for i in range(2) for m in range(3)]
    seeds = seed_matrix(list(reversed(rows)), 2, 3)
    assert seeds[1, 2].item() == image_seed(7, 1, 2, 3)
    noise = prior_noise(seeds[[1, 0]][:, [2, 0]], (1, 4, 6))
    assert noise.shape == (2, 2, 1, 4, 6)
    assert torch.equal(noise[0, 0], initial_noise([image_seed(7, 1, 2, 3)], (1, 4, 6))[0])
    assert torch.equal(noise[1, 1], initial_noise([image_seed(7, 0, 0, 3)], (1, 4, 6))[0])


def test_seed_matrix_without_seeds_is_an_error():
    with pytest.raises(ValueError, match="seed"):
        seed_matrix([{"prompt_index": 0, "member": 0}], 1, 1)


def test_prior_noise_gives_each_member_its_own_epsilon(tiny_params, one_thread, monkeypatch):
    """With prior noise, x_t of each member is built from that member's noise, reordered with it by reward."""
    import gdro_core.objectives.offline as offline

    p = tiny_params
    model = _model(p)
    add_lora(model.transformer, p.train.lora)
    shape = (1, p.world.height, p.world.width)
    x0 = torch.zeros(1, 2, *shape)
    noise = torch.stack([torch.full(shape, 1.0), torch.full(shape, 2.0)]).unsqueeze(0)
    seen = {}

    def spy(x0f, eps, t):
        seen["eps"] = eps.clone()
        return real(x0f, eps, t)

    real = offline.interpolate
    monkeypatch.setattr(offline, "interpolate", spy)
    with torch.no_grad():
        cond = model.encode(['a "123"'])
    rewards = torch.tensor([[0.1, 0.9]])  # member 1 is best: sorted first
    cfg = _cfg(p, objective="gdro")
    draws = draw_randomness(rewards, shape, cfg, torch.Generator().manual_seed(0), member_noise=noise)
    group_objective(model, x0, cond, rewards, cfg, draws=draws)
    assert seen["eps"][0].unique().tolist() == [2.0] and seen["eps"][1].unique().tolist() == [1.0]
    group_objective(model, x0, cond, rewards, _cfg(p, objective="gdro"), torch.Generator().manual_seed(0))
    assert torch.equal(seen["eps"][0], seen["eps"][1])  # fresh: one ε shared by the group


def test_velocity_norm_ratio_hand_value():
    pol = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # norms 5, 2 -> mean 3.5
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # norms 1, 1 -> mean 1
    assert velocity_norm_ratio(pol, ref).item() == pytest.approx(3.5)


def test_velocity_norm_probe_is_one_for_a_fresh_adapter_and_moves_when_it_learns(tiny_params, one_thread):
    from gdro_core.evaluation.monitor import velocity_norm_probe
    from gdro_core.tasks.ocr.prompts import OcrPrompt

    p = tiny_params
    model = _model(p)
    add_lora(model.transformer, p.train.lora)
    prompts = [OcrPrompt(prompt='"123" on a sign', target="123"), OcrPrompt(prompt='"456" on a sign', target="456")]
    assert velocity_norm_probe(model, prompts, [0, 1], 2) == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        for n, q in model.transformer.named_parameters():
            if "lora_B" in n:
                q.add_(0.5)
    assert abs(velocity_norm_probe(model, prompts, [0, 1], 2) - 1.0) > 1e-3


@pytest.mark.parametrize("objective, noise", [("gdro", "prior"), ("offline_dpo", "fresh"), ("dpo", "prior")])
def test_training_loop_runs_every_variant_and_prior_noise_changes_the_weights(tiny_params, one_thread, tmp_path,
                                                                              objective, noise):
    from gdro_core.data.rollout import Rollouts
    from gdro_core.training.loop import train

    p = tiny_params
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 1, p.world.height, p.world.width, generator=g)
    model = _model(p)
    with torch.no_grad():
        cond = model.encode([f'a sign "{i}{i}{i}"' for i in range(3)])
    rows = [{"prompt_index": i, "member": m, "seed": image_seed(5, i, m, 4)} for i in range(3) for m in range(4)]
    data, rewards = Rollouts(latents=latents, cond=cond, rows=rows), torch.rand(3, 4, generator=g)
    runs = {}
    for kind in dict.fromkeys(("fresh", noise)):
        cfg = p.train.model_copy(update={"objective": objective, "noise": kind, "steps": 2})
        logs = []
        runs[kind] = train(_model(p), data, rewards, cfg, tmp_path / kind, lambda s, m: logs.append(m))
        assert len(logs) == 2 and all(math.isfinite(m["train/loss"]) for m in logs)
    if noise == "prior":
        assert any(not torch.allclose(runs["fresh"][k], runs["prior"][k]) for k in runs["fresh"] if "lora_B" in k)
