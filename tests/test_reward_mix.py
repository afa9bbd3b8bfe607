"""The sparse/RED mix shared by red_ppo and the verl integration: its values and its errors."""

import pytest
import torch

from red_kernels.reward_mix import check_reward_mix, mix_rewards


def test_mix_values():
    torch.manual_seed(0)
    red, sparse = torch.randn(3, 7), torch.randn(3, 7)
    assert mix_rewards(red, sparse, 1.0) is red  # no rounding through 1 * red + 0 * sparse
    assert torch.equal(mix_rewards(red, sparse, 0.0), sparse)
    torch.testing.assert_close(mix_rewards(red, sparse, 0.25), 0.25 * red + 0.75 * sparse, rtol=0, atol=0)
    red64, sparse64 = red.double(), sparse.double()
    torch.testing.assert_close(mix_rewards(red, sparse, 0.3), (0.3 * red64 + 0.7 * sparse64).float(),
                               rtol=0, atol=1e-6)


def test_good_settings_pass():
    check_reward_mix({"mode": "red", "baseline": "prompt", "beta_c": 1.0})
    check_reward_mix({"mode": "sparse", "baseline": "zero", "beta_c": 0})
    check_reward_mix({"scorer": "anything"})  # keys other than the mix's are not looked at


@pytest.mark.parametrize("settings,prefix,message", [
    ({"mode": "dense"}, "", "mode: expected 'red' or 'sparse', got 'dense'"),
    ({"mode": "red", "baseline": "mean"}, "reward.", "reward.baseline: expected 'prompt' or 'zero', got 'mean'"),
    ({"beta_c": 1.5}, "reward.", "reward.beta_c: expected a number in [0, 1], got 1.5"),
    ({"beta_c": -0.1}, "", "beta_c: expected a number in [0, 1], got -0.1"),
    ({"beta_c": True}, "", "beta_c: expected a number in [0, 1], got True"),
    ({"beta_c": "0.5"}, "", "beta_c: expected a number in [0, 1], got '0.5'"),
    ({"beta_c": float("nan")}, "", "beta_c: expected a number in [0, 1], got nan"),
    ({"mode": "dense", "beta_c": 2}, "reward.reward_kwargs.red.",
     "reward.reward_kwargs.red.mode: expected 'red' or 'sparse', got 'dense'"),  # the first bad one is named
], ids=["mode", "baseline", "beta_c-high", "beta_c-low", "beta_c-bool", "beta_c-str", "beta_c-nan", "first"])
def test_bad_settings_are_named(settings, prefix, message):
    with pytest.raises(ValueError) as error:
        check_reward_mix(settings, prefix)
    assert str(error.value) == message
