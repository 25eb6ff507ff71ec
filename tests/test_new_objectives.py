"""DiffusionNFT, AWM and LAIR: each loss against values worked out by hand, and each trains through the harness."""

import math

import pytest
import torch
from conftest import TINY
from training_fixtures import tiny_data, tiny_model

from gdro_core.models.lora import lora_state
from gdro_core.objectives.awm import awm_loss
from gdro_core.objectives.diffusion_nft import (
    adaptive_x0_error,
    implicit_policies,
    nft_loss,
    old_policy_decay,
    optimality_probability,
    soft_update,
)
from gdro_core.objectives.group_loss import centred_softmax_weights, listwise_weighted_loss
from gdro_core.objectives.implicit_reward import flow_matching_error
from gdro_core.params import parse_params
from gdro_core.tasks.ocr.prompts import OcrPrompt
from gdro_core.training.checkpoint import load_latest
from gdro_core.training.loop import train
from gdro_core.training.online_grpo import encode_prompts, train_online

PROMPTS = [OcrPrompt(f'a sign that says "{t}"', t) for t in ("123", "456", "789")]
ONLINE = {"grpo_prompts_per_iteration": 2, "grpo_group_size": 3, "grpo_sample_steps": 3, "grpo_timestep_fraction": 0.67,
          "grpo_minibatches": 2, "steps": 2, "checkpoint_every": 1, "lr": 1e-3}


# ---------------------------------------------------------------- DiffusionNFT


def test_optimality_probability_maps_clipped_advantages_onto_unit_interval():
    a = torch.tensor([-7.0, -5.0, -1.0, 0.0, 2.5, 5.0, 9.0])
    # r = clip(A, ±5) / 10 + 1/2
    assert optimality_probability(a, 5.0).tolist() == pytest.approx([0.0, 0.0, 0.4, 0.5, 0.75, 1.0, 1.0])


def test_implicit_policies_sit_symmetrically_around_the_old_policy():
    v_pol, v_old = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 1.0]])
    v_pos, v_neg = implicit_policies(v_pol, v_old, 0.1)
    # (1 − β) v_old + β v_θ and (1 + β) v_old − β v_θ
    assert v_pos[0].tolist() == pytest.approx([1.1, 0.8])
    assert v_neg[0].tolist() == pytest.approx([0.9, 1.2])
    assert torch.allclose((v_pos + v_neg) / 2, v_old)


def test_nft_loss_matches_hand_value():
    """Two samples of two elements; every number below by hand from the reference's formula."""
    v_pol = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    v_old = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    v_tgt = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    t = torch.tensor([0.5, 0.2])
    r = torch.tensor([0.75, 0.25])
    beta, m = 0.5, 5.0
    # sample 0: v+ = (0.5, 0), v- = (-0.5, 0); x̂0 − x0 = t (v − v_tgt)
    #   + : 0.5 · (-0.5, -1) = (-0.25, -0.5): mean sq = (0.0625 + 0.25)/2 = 0.15625, mean abs = 0.375
    #   - : 0.5 · (-1.5, -1) = (-0.75, -0.5): mean sq = (0.5625 + 0.25)/2 = 0.40625, mean abs = 0.625
    pos0, neg0 = 0.15625 / 0.375, 0.40625 / 0.625
    # sample 1: v+ = (0.75, 0.25), v- = (1.25, -0.25)
    #   + : 0.2 · (0.75, -0.75) = (0.15, -0.15): mean sq 0.0225, mean abs 0.15
    #   - : 0.2 · (1.25, -1.25) = (0.25, -0.25): mean sq 0.0625, mean abs 0.25
    pos1, neg1 = 0.0225 / 0.15, 0.0625 / 0.25
    expected = m * ((0.75 * pos0 + 0.25 * neg0) + (0.25 * pos1 + 0.75 * neg1)) / 2 / beta
    assert adaptive_x0_error(*implicit_policies(v_pol, v_old, beta)[:1], v_tgt, t).tolist() == pytest.approx(
        [pos0, pos1])
    loss, parts = nft_loss(v_pol, v_old, v_tgt, t, r, beta, m)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert parts["kl"] == 0.0 and parts["old_deviation"] == pytest.approx((1 + 0 + 0.25 + 0.25) / 4)
    # the KL term: β_KL · mean over samples of the element-mean ‖v_θ − v_ref‖²
    v_ref = torch.zeros_like(v_pol)
    loss_kl, parts_kl = nft_loss(v_pol, v_old, v_tgt, t, r, beta, m, v_ref=v_ref, kl_beta=0.1)
    assert parts_kl["kl"] == pytest.approx((0.5 + 0.25) / 2)
    assert loss_kl.item() == pytest.approx(expected + 0.1 * 0.375, rel=1e-6)


def test_nft_gradient_pulls_the_policy_towards_good_samples_only():
    """r = 1: the gradient is that of ‖v⁺ − v_tgt‖², which moves v_θ towards the target; r = 0 away from it."""
    v_old, v_tgt, t = torch.zeros(1, 4), torch.ones(1, 4), torch.tensor([0.5])
    for r, sign in ((1.0, -1.0), (0.0, 1.0)):
        v_pol = torch.zeros(1, 4, requires_grad=True)
        loss, _ = nft_loss(v_pol, v_old, v_tgt, t, torch.tensor([r]), 1.0, 5.0)
        loss.backward()
        assert (torch.sign(v_pol.grad) == sign).all()


def test_old_policy_decay_follows_the_reference_schedules():
    # decay_type 1: (flat 0, rate 0.001, max 0.5); decay_type 2: (75, 0.0075, 0.999)
    assert [old_policy_decay(s, 0, 0.001, 0.5) for s in (0, 1, 300, 600)] == pytest.approx([0.0, 0.001, 0.3, 0.5])
    assert [old_policy_decay(s, 75, 0.0075, 0.999) for s in (10, 75, 175, 500)] == pytest.approx([0.0, 0.0, 0.75, 0.999])


def test_soft_update_is_the_reference_convex_combination():
    old, live = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 0.0])}
    soft_update(old, live, 0.25)
    assert old["w"].tolist() == pytest.approx([0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 0])


# ---------------------------------------------------------------- AWM


def test_awm_loss_matches_hand_value():
    v_tgt = torch.tensor([[1.0, 1.0], [0.0, 2.0], [1.0, 0.0]])
    v_pol = torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]], requires_grad=True)
    err = flow_matching_error(v_tgt, v_pol)  # (0.5, 1.0, 0.0)
    adv = torch.tensor([1.5, -7.0, 0.3])  # −7 is clamped to −5
    loss, parts = awm_loss(err, adv, adv_clip_max=5.0)
    assert loss.item() == pytest.approx((1.5 * 0.5 - 5.0 * 1.0 + 0.3 * 0.0) / 3)
    assert parts["kl"] == 0.0
    v_ref = torch.zeros_like(v_pol)
    loss_kl, parts_kl = awm_loss(err, adv, 5.0, v_pol, v_ref, kl_beta=0.5)
    kl = (0.5 + 1.0 + 0.5) / 3
    assert parts_kl["kl"] == pytest.approx(kl)
    assert loss_kl.item() == pytest.approx(loss.item() + 0.5 * kl)
    # a positive advantage lowers the sample's error, a negative one raises it
    loss.backward()
    assert torch.allclose(v_pol.grad[0], torch.tensor([-1.5 * 2 * (1.0 - 0.0) / 2 / 3, 0.0]))
    assert (v_pol.grad[1] * (v_pol.detach()[1] - v_tgt[1]) < 0).any()


# ---------------------------------------------------------------- LAIR


def test_centred_softmax_weights_match_hand_value():
    r = torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.2, 0.2]])
    e = [math.exp(2.0), math.exp(1.0), 1.0]
    expected = [x / sum(e) - 1 / 3 for x in e]
    w = centred_softmax_weights(r, tau=0.5)
    assert w[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert w[1].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-7)  # equal rewards carry no signal
    assert centred_softmax_weights(torch.tensor([[1.0, 1.0, 0.0]]), 0.0)[0].tolist() == pytest.approx(
        [1 / 6, 1 / 6, -1 / 3])


def test_listwise_weighted_loss_matches_hand_value_and_its_optimum():
    s = torch.tensor([[0.5, -0.2, 0.1]], requires_grad=True)
    r = torch.tensor([[1.0, 0.5, 0.0]])
    w = centred_softmax_weights(r, 0.5)[0].tolist()
    lam = 2.0
    expected = sum(-wi * si + lam / 2 * si**2 for wi, si in zip(w, [0.5, -0.2, 0.1]))
    loss = listwise_weighted_loss(s, r, 0.5, lam)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # the gradient vanishes at s* = w / λ
    star = (torch.tensor([w]) / lam).requires_grad_(True)
    listwise_weighted_loss(star, r, 0.5, lam).backward()
    assert star.grad.abs().max() < 1e-6


# ---------------------------------------------------------------- through the harness


def _params(**train):
    return parse_params({**TINY, "train": {**TINY["train"], **train}}, "tiny test params")


def brightness(images, targets):
    import numpy as np

    return [float(np.asarray(im, dtype=np.float32).mean() / 255) for im in images]


def _online(p, ckpt, logs=None, checkpoints=None):
    model = tiny_model(p)
    cond, null = encode_prompts(model, PROMPTS, batch_size=8)
    return train_online(model, PROMPTS, cond, null, brightness, p.train, ckpt,
                        lambda s, m: logs.append((s, m)) if logs is not None else None,
                        on_checkpoint=(lambda s, w: checkpoints.append(s)) if checkpoints is not None else None,
                        eval_every=1, guidance=1.0), model


@pytest.mark.parametrize("objective, extra", [
    ("diffusion_nft", {"nft_decay_flat": 0, "nft_decay_rate": 0.125, "nft_kl_beta": 0.01}),
    ("awm", {"awm_kl_beta": 0.01}),
])
def test_online_objective_trains_through_the_harness(objective, extra, tmp_path):
    p = _params(objective=objective, **ONLINE, **extra)
    logs, checkpoints = [], []
    weights, model = _online(p, tmp_path, logs, checkpoints)
    assert [s for s, _ in logs] == [1, 2] and checkpoints == [1, 2]
    for _, m in logs:
        for key in ("train/loss", "train/policy_loss", "train/kl", "train/grad_norm", "train/reward"):
            assert math.isfinite(m[key]), key
    assert logs[-1][1]["train/kl"] > 0  # after one update the policy is off the reference
    b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert b and any(v.abs().sum() > 0 for v in b.values())  # B starts at zero
    live = lora_state(model.transformer)
    assert all(torch.equal(live[k], weights[k]) for k in weights)  # the EMA is what the model ends with
    saved, _ = load_latest(tmp_path)
    has_old = any(k.startswith("old.") for k in saved)
    assert has_old == (objective == "diffusion_nft")
    if has_old:  # the sampling policy lags the policy: decay 0.5 after the 4 updates of 2 iterations
        assert logs[-1][1]["train/old_decay"] == pytest.approx(0.5)
        lora = {k.removeprefix("lora."): v for k, v in saved.items() if k.startswith("lora.")}
        old = {k.removeprefix("old."): v for k, v in saved.items() if k.startswith("old.")}
        assert old.keys() == lora.keys() and any(not torch.equal(old[k], lora[k]) for k in old)


def test_interrupted_diffusion_nft_resumes_to_the_same_weights(tmp_path):
    p = _params(objective="diffusion_nft", **ONLINE, nft_decay_flat=0, nft_decay_rate=0.25)
    full, _ = _online(p, tmp_path / "a")
    short = p.model_copy(update={"train": p.train.model_copy(update={"steps": 1})})
    _online(short, tmp_path / "b")
    resumed, _ = _online(p, tmp_path / "b")
    for k in full:
        assert torch.allclose(full[k], resumed[k], atol=1e-6), k


def test_lair_trains_through_the_offline_harness(tmp_path):
    p = _params(objective="lair", lair_tau=0.1, lr=1e-3)
    data, rewards = tiny_data(p)
    logs = []
    weights = train(tiny_model(p), data, rewards, p.train, tmp_path, lambda s, m: logs.append((s, m)))
    assert [s for s, _ in logs] == [1, 2, 3, 4]
    assert logs[0][1]["train/loss_main"] == pytest.approx(0.0, abs=1e-6)  # s ≡ 0 at B = 0
    assert logs[0][1]["train/loss_anchor"] > 0 and all(math.isfinite(m["train/loss"]) for _, m in logs)
    assert logs[-1][1]["train/loss_main"] < 0  # the policy has moved along the weights: −w·s + λ/2 s² < 0
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)


def test_online_objectives_stay_in_one_process():
    with pytest.raises(ValueError, match="one process"):
        _params(objective="diffusion_nft", num_processes=2)


def test_lending_the_adapter_the_sampling_policy_keeps_the_trained_parameters(tmp_path):
    """The optimiser holds the adapter's parameters: a swap to the old weights must copy in place and copy back."""
    from gdro_core.models.families import add_lora
    from gdro_core.training.online_matching import lora_weights

    p = _params()
    model = tiny_model(p)
    params = add_lora(model.transformer, p.train.lora)
    live = {k: v.clone() for k, v in lora_state(model.transformer).items()}
    other = {k: torch.full_like(v, 0.5) for k, v in live.items()}
    with lora_weights(model.transformer, other):
        assert all((v == 0.5).all() for v in lora_state(model.transformer).values())
    adapter = [q for n, q in model.transformer.named_parameters() if "lora_" in n]
    assert len(adapter) == len(params) and all(a is b for a, b in zip(adapter, params))
    assert all(torch.equal(lora_state(model.transformer)[k], live[k]) for k in live)
