"""GDRO group losses against values worked out by hand (method page §3)."""

import math

import pytest
import torch

from gdro_core.objectives.group_loss import dpo_loss, plackett_luce_loss, plackett_luce_targets, sort_groups

S = torch.tensor([[0.5, -0.2, 0.1]])
R = torch.tensor([[1.0, 0.5, 0.0]])


def lse(*xs):
    return math.log(sum(math.exp(x) for x in xs))


def test_pure_ranking_matches_hand_value():
    # L_rank = [lse(s1,s2,s3) - s1] + [lse(s2,s3) - s2]
    expected = (lse(0.5, -0.2, 0.1) - 0.5) + (lse(-0.2, 0.1) + 0.2)
    assert expected == pytest.approx(1.627655, abs=1e-6)
    assert plackett_luce_loss(S, R, tau=0.0).item() == pytest.approx(expected, abs=1e-6)


def test_soft_targets_match_hand_value():
    # tau = 0.5: q_1 = softmax(2, 1, 0), q_2 = softmax(1, 0)
    q1 = [math.exp(2) / (math.exp(2) + math.exp(1) + 1), math.exp(1) / (math.exp(2) + math.exp(1) + 1)]
    q1.append(1 - sum(q1))
    q2 = [math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1)]
    pos1 = lse(0.5, -0.2, 0.1) - (q1[0] * 0.5 - q1[1] * 0.2 + q1[2] * 0.1)
    pos2 = lse(-0.2, 0.1) - (-q2[0] * 0.2 + q2[1] * 0.1)
    assert pos1 + pos2 == pytest.approx(1.754295, abs=1e-5)
    assert plackett_luce_loss(S, R, tau=0.5).item() == pytest.approx(pos1 + pos2, abs=1e-6)
    # top-1 cross-entropy is the first position alone
    assert plackett_luce_loss(S, R, tau=0.5, positions=1).item() == pytest.approx(pos1, abs=1e-6)


def test_k2_pure_ranking_is_diffusion_dpo():
    s = torch.tensor([[1.0, 0.3], [-0.4, 0.9]])
    r = torch.tensor([[1.0, 0.0], [0.7, 0.2]])
    expected = (math.log1p(math.exp(-0.7)) + math.log1p(math.exp(1.3))) / 2
    assert plackett_luce_loss(s, r, tau=0.0).item() == pytest.approx(expected, abs=1e-6)
    assert dpo_loss(s[:, 0], s[:, 1]).item() == pytest.approx(expected, abs=1e-6)


def test_small_tau_approaches_pure_ranking():
    assert plackett_luce_loss(S, R, tau=1e-3).item() == pytest.approx(plackett_luce_loss(S, R, tau=0.0).item(), abs=1e-6)


@pytest.mark.parametrize("tau", [0.0, 0.05, 0.5])
def test_shifting_all_rewards_changes_nothing(tau):
    s, r = torch.randn(4, 6), torch.rand(4, 6).sort(dim=1, descending=True).values
    assert plackett_luce_loss(s, r + 3.0, tau).item() == pytest.approx(plackett_luce_loss(s, r, tau).item(), abs=1e-5)


def test_equal_rewards_give_uniform_targets():
    q = plackett_luce_targets(torch.zeros(1, 4), tau=0.05)
    assert torch.allclose(q[0, 0], torch.full((4,), 0.25))
    assert torch.allclose(q[0, 2], torch.tensor([0.0, 0.0, 0.5, 0.5]))
    q0 = plackett_luce_targets(torch.zeros(1, 4), tau=0.0)
    assert torch.allclose(q0, q)


def test_ties_are_broken_uniformly_at_random():
    r = torch.tensor([[1.0, 1.0, 0.0]]).expand(2000, 3)
    order = sort_groups(r, torch.Generator().manual_seed(0))
    assert (order[:, 2] == 2).all()  # the lowest reward is always last
    share = (order[:, 0] == 0).float().mean().item()
    assert 0.45 < share < 0.55


def test_tie_rule_makes_expected_loss_symmetric():
    s = torch.tensor([0.3, -0.5, 0.2])
    r = torch.tensor([1.0, 1.0, 0.0])
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(400):
        o = sort_groups(r.unsqueeze(0), gen)[0]
        losses.append(plackett_luce_loss(s[o].unsqueeze(0), r[o].unsqueeze(0), tau=0.0).item())
    a = plackett_luce_loss(s[[0, 1, 2]].unsqueeze(0), r.unsqueeze(0), tau=0.0).item()
    b = plackett_luce_loss(s[[1, 0, 2]].unsqueeze(0), r.unsqueeze(0), tau=0.0).item()
    assert sum(losses) / len(losses) == pytest.approx((a + b) / 2, abs=0.05 * abs(a - b) + 1e-6)


def test_sort_groups_orders_best_first():
    r = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.8]])
    o = sort_groups(r)
    assert torch.equal(torch.gather(r, 1, o), torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.3, 0.2]]))


def test_gradient_raises_best_and_lowers_worst():
    s = torch.zeros(1, 4, requires_grad=True)
    plackett_luce_loss(s, torch.tensor([[1.0, 0.6, 0.3, 0.0]]), tau=0.05).backward()
    assert torch.isfinite(s.grad).all()
    assert s.grad[0, 0] < 0 < s.grad[0, 3]  # descent raises s_1, lowers s_k


def test_group_of_one_is_rejected():
    with pytest.raises(ValueError, match="at least 2"):
        plackett_luce_loss(torch.zeros(1, 1), torch.zeros(1, 1), tau=0.05)
