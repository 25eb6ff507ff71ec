"""The offline training loop: loss decomposition, reference = adapter off, exact resume."""

import math

import pytest
import torch

from gdro_core.data.rollout import Rollouts
from gdro_core.models.base import velocity
from gdro_core.models.builtin import BuiltinModelAdapter, build_builtin_pipeline
from gdro_core.models.families import add_lora
from gdro_core.models.lora import reference
from gdro_core.objectives.offline import anchor_weight, draw_groups, group_objective
from gdro_core.training.loop import ema_decay, train


def _model(p):
    pipe = build_builtin_pipeline(p.model.builtin, p.image_shape, p.sampler.shift, seed=0)
    return BuiltinModelAdapter(pipe, (p.world.height, p.world.width))


def _data(p, n_prompts=3, n=4):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(n_prompts, n, 1, p.world.height, p.world.width, generator=g)
    model = _model(p)
    with torch.no_grad():
        cond = model.encode([f'a sign "{i}{i}{i}"' for i in range(n_prompts)])
    rows = [{"prompt_index": i, "member": m} for i in range(n_prompts) for m in range(n)]
    return Rollouts(latents=latents, cond=cond, rows=rows), torch.rand(n_prompts, n, generator=g)


@pytest.mark.parametrize("objective, expected_main", [
    ("gdro", math.log(6)), ("dpo", math.log(2)), ("dpo_anchor", math.log(2)), ("offline_dpo", math.log(2)),
    ("sft_best", 0.0), ("lair", 0.0),
])
def test_fresh_adapter_gives_textbook_losses_and_total_decomposes(tiny_params, objective, expected_main):
    """B = 0 at init, so policy == reference, s ≡ 0: GDRO over k=3 gives log 3! per group, DPO log 2, LAIR 0."""
    p = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(update={"objective": objective})})
    model = _model(p)
    add_lora(model.transformer, p.train.lora)
    data, rewards = _data(p)
    loss, parts = group_objective(model, data.latents[:2, :3], {k: v[:2] for k, v in data.cond.items()},
                                  rewards[:2, :3], p.train, torch.Generator().manual_seed(0))
    assert parts["loss_main"] == pytest.approx(expected_main, abs=1e-5)
    gamma = {"sft_best": 1.0, "dpo": 0.0, "offline_dpo": 0.0, "lair": 0.0}.get(objective, p.train.gamma)
    assert anchor_weight(p.train) == gamma
    assert loss.item() == pytest.approx(parts["loss_main"] + gamma * parts["loss_anchor"], rel=1e-5)
    loss.backward()
    grads = [q.grad for n, q in model.transformer.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_reference_is_the_adapter_switched_off(tiny_params):
    p = tiny_params
    model = _model(p)
    x, t = torch.randn(2, 1, p.world.height, p.world.width), torch.tensor([0.3, 0.7])
    cond = model.encode(['a "123"', 'a "456"'])
    with torch.no_grad():
        before = velocity(model, x, t, cond)
        add_lora(model.transformer, p.train.lora)
        for n, q in model.transformer.named_parameters():
            if "lora_B" in n:
                q.add_(0.1)
        with reference(model.transformer):
            ref = velocity(model, x, t, cond)
        policy = velocity(model, x, t, cond)
    assert torch.allclose(ref, before, atol=1e-6)
    assert not torch.allclose(policy, before, atol=1e-3)


def test_stratified_groups_span_the_pool():
    rewards = torch.arange(16.0).flip(0).unsqueeze(0).repeat(5, 1)
    _, members = draw_groups(rewards, 5, 4, "stratified", torch.Generator().manual_seed(0))
    strata = (members // 4).sort(dim=1).values
    assert torch.equal(strata, torch.arange(4).repeat(5, 1))


def test_group_larger_than_pool_is_rejected():
    with pytest.raises(ValueError, match="group_size"):
        draw_groups(torch.zeros(2, 3), 2, 4, "random", torch.Generator())


def test_ema_follows_the_paper_schedule():
    assert ema_decay(100, 0.001, 0.5) == pytest.approx(0.1)
    assert ema_decay(10_000, 0.001, 0.5) == 0.5


def test_interrupted_training_resumes_to_the_same_weights(tiny_params, tmp_path):
    p = tiny_params
    data, rewards = _data(p)
    logs = []
    full = train(_model(p), data, rewards, p.train, tmp_path / "a", lambda s, m: logs.append(s))
    assert logs[-1] == p.train.steps and any(v.abs().sum() > 0 for k, v in full.items() if "lora_B" in k)

    half = p.train.model_copy(update={"steps": 2})
    train(_model(p), data, rewards, half, tmp_path / "b", lambda s, m: None)
    resumed_logs = []
    resumed = train(_model(p), data, rewards, p.train, tmp_path / "b", lambda s, m: resumed_logs.append(s))
    assert resumed_logs[0] == 3  # picked up after the step-2 checkpoint
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.allclose(full[k], resumed[k], atol=1e-6), k


def test_reward_table_that_does_not_match_rollouts_is_rejected(tiny_params, tmp_path):
    data, rewards = _data(tiny_params)
    with pytest.raises(ValueError, match="do not match"):
        train(_model(tiny_params), data, rewards[:, :2], tiny_params.train, tmp_path, lambda s, m: None)
