"""GAE, KL estimators, whitening, and the PPO losses against hand-computed values."""

import math

import pytest
import torch

from red_ppo.gae import compute_gae
from red_ppo.losses import explained_variance, policy_loss, value_loss
from red_ppo.rewards import AdaptiveKLController, FixedKLController, kl_per_token, masked_mean, shape_rewards, whiten


def test_gae_matches_hand_computation():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 7.0, 7.0]])
    values = torch.tensor([[0.5, 0.2, -0.1], [1.0, 9.0, 9.0]])  # 7 and 9 sit on padding and must not count
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # Row 0, backwards: delta2 = 2 - (-0.1) = 2.1; delta1 = 0 + 0.9 * -0.1 - 0.2 = -0.29;
    # delta0 = 1 + 0.9 * 0.2 - 0.5 = 0.68; A1 = -0.29 + 0.72 * 2.1; A0 = 0.68 + 0.72 * A1.
    a2, a1 = 2.1, -0.29 + 0.72 * 2.1
    a0 = 0.68 + 0.72 * a1
    expected = torch.tensor([[a0, a1, a2], [0.5 - 1.0, 0.0, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, torch.tensor([[a0 + 0.5, a1 + 0.2, a2 - 0.1], [0.5, 0.0, 0.0]]))


def test_gae_with_gamma_lambda_one_gives_reward_to_go():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    values = torch.tensor([[0.3, -0.2, 0.9, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns, torch.tensor([[6.0, 5.0, 3.0, 0.0]]))
    torch.testing.assert_close(advantages, torch.tensor([[5.7, 5.2, 2.1, 0.0]]))


def test_gae_lambda_zero_is_one_step_td():
    rewards = torch.tensor([[1.0, -1.0]])
    values = torch.tensor([[0.25, 0.5]])
    advantages, _ = compute_gae(rewards, values, torch.ones(1, 2), gamma=0.5, lam=0.0)
    torch.testing.assert_close(advantages, torch.tensor([[1.0 + 0.25 - 0.25, -1.0 - 0.5]]))


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    torch.testing.assert_close(kl_per_token(logp, ref, "k1"), torch.tensor([math.log(2.0)]))
    # k3 = (r - 1) - log r with r = p_ref / p = 0.5
    torch.testing.assert_close(kl_per_token(logp, ref, "k3"), torch.tensor([-0.5 + math.log(2.0)]))
    assert kl_per_token(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError, match="estimator"):
        kl_per_token(logp, ref, "k2")


def test_kl_estimators_are_unbiased_and_k3_nonnegative():
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    exact = (p * (p / q).log()).sum()
    samples = torch.multinomial(p, 200_000, replacement=True)
    logp, logq = p.log()[samples], q.log()[samples]
    k1, k3 = kl_per_token(logp, logq, "k1"), kl_per_token(logp, logq, "k3")
    assert abs(k1.mean() - exact) < 0.01
    assert abs(k3.mean() - exact) < 0.01
    assert (k3 >= 0).all()


def test_policy_loss_by_hand():
    ratio = torch.tensor([[1.5, 0.5, 1.0, 0.5, 3.0]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])  # the last entry is padding
    old = torch.zeros_like(ratio)
    loss, stats = policy_loss(ratio.log(), old, advantages, mask, clip_range=0.2)
    # max(-A r, -A clip(r)): -1.2 (clipped), -0.5, 1.0, 0.8 (clipped)
    torch.testing.assert_close(loss, torch.tensor((-1.2 - 0.5 + 1.0 + 0.8) / 4))
    torch.testing.assert_close(stats["clipfrac"], torch.tensor(0.5))
    approx = 0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4
    torch.testing.assert_close(stats["approx_kl"], torch.tensor(approx))


def test_policy_loss_gradient_is_zero_where_clipped():
    logprobs = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    loss, _ = policy_loss(logprobs, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), clip_range=0.2)
    loss.backward()
    assert logprobs.grad[0, 0] == 0.0
    torch.testing.assert_close(logprobs.grad[0, 1], torch.tensor(-1.1 / 2))


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0, 0.55, 4.0]])
    old = torch.tensor([[0.5, 0.5, 0.5, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = value_loss(values, old, returns, mask, clip_range=0.2)
    # (V - R)^2 vs (clip(V, old +- 0.2) - R)^2: max(1, 1.69), max(0, 0.09), max(0.2025, 0.2025)
    torch.testing.assert_close(loss, torch.tensor(0.5 * (1.69 + 0.09 + 0.2025) / 3))
    torch.testing.assert_close(stats["clipfrac"], torch.tensor(2 / 3))
    unclipped, _ = value_loss(values, old, returns, mask, clip_range=None)
    torch.testing.assert_close(unclipped, torch.tensor(0.5 * (1.0 + 0.0 + 0.2025) / 3))


def test_whiten_and_masked_mean_ignore_padding():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert masked_mean(values, mask).item() == pytest.approx(3.0)
    white = whiten(values, mask)
    real = white[mask.bool()]
    assert real.mean().abs() < 1e-6 and real.std().item() == pytest.approx(1.0, abs=1e-4)
    assert white[0, 2] == 0
    kept = whiten(values, mask, shift_mean=False)
    assert kept[mask.bool()].mean().item() == pytest.approx(3.0, abs=1e-5)


def test_shape_rewards_subtracts_kl():
    rm = torch.tensor([[0.0, 0.0, 5.0], [-4.0, 0.0, 0.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    out = shape_rewards(rm, kl, mask, kl_coef=0.5)
    torch.testing.assert_close(out, torch.tensor([[-0.05, -0.1, 5.0 - 0.15], [-4.0 - 0.2, 0.0, 0.0]]))


def test_kl_controllers():
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1
    adaptive = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    adaptive.update(12.0, 100)  # error clipped to +0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    adaptive.update(5.4, 100)  # error -0.1
    assert adaptive.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 0.1))
    restored = AdaptiveKLController(1.0, 6.0, 1000)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == adaptive.value


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0)
    assert math.isnan(explained_variance(returns, torch.ones_like(returns), torch.ones_like(returns)))
