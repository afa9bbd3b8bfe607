"""Sparse and RED reward placement on padded rollouts: left-padded prompts, responses of
different lengths, a response without EOS and an empty response."""

import pytest
import torch

import red_kernels
from red_ppo.rewards import mixed_rewards, red_rewards, sparse_rewards
from red_ppo.rollout import Rollout, build_rollout, left_pad, position_ids, truncate_after_eos

PAD, EOS = 0, 2


def padded_batch() -> Rollout:
    """Four rows, prompts of 2, 4, 1 and 3 tokens (left-padded to P=4), responses of width R=5:
    'a b EOS', 'a b c d e' (no EOS), 'EOS x y' (EOS first), and an empty response."""
    prompt_ids, prompt_mask = left_pad([[11, 12], [13, 14, 15, 16], [17], [18, 19, 20]], PAD)
    responses = torch.tensor([
        [21, 22, EOS, 23, 24],  # after EOS: truncated
        [21, 22, 23, 24, 25],  # no EOS: all five count
        [EOS, 26, 27, 28, 29],  # only the EOS counts
        [30, 31, 32, 33, 34],  # made empty below
    ])
    rollout = build_rollout(prompt_ids, prompt_mask, responses, EOS, PAD)
    rollout.response_mask[3] = 0
    rollout.attention_mask[3, 4:] = 0
    rollout.input_ids[3, 4:] = PAD
    return rollout


def test_truncate_after_eos_and_layout():
    rollout = padded_batch()
    assert rollout.prompt_width == 4
    assert rollout.lengths.tolist() == [3, 5, 1, 0]
    assert rollout.responses[0].tolist() == [21, 22, EOS, PAD, PAD]
    assert rollout.attention_mask.tolist() == [
        [0, 0, 1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 1, 1, 0, 0, 0, 0],
        [0, 1, 1, 1, 0, 0, 0, 0, 0],
    ]
    assert rollout.response_lists() == [[21, 22, EOS], [21, 22, 23, 24, 25], [EOS], []]
    assert rollout.prompt_lists()[0] == [11, 12]
    ids, mask = truncate_after_eos(torch.tensor([[EOS, EOS, 5]]), EOS, PAD)
    assert ids.tolist() == [[EOS, PAD, PAD]] and mask.tolist() == [[1.0, 0.0, 0.0]]


def test_position_ids_count_real_tokens():
    rollout = padded_batch()
    assert position_ids(rollout.attention_mask)[0, 2:7].tolist() == [0, 1, 2, 3, 4]


def test_sparse_reward_on_last_response_token():
    rollout = padded_batch()
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    rewards = sparse_rewards(scores, rollout.response_mask)
    assert rewards.tolist() == [
        [0.0, 0.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 2.0],  # no EOS: the last sampled token
        [3.0, 0.0, 0.0, 0.0, 0.0],  # the EOS itself
        [0.0, 0.0, 0.0, 0.0, 0.0],  # empty: nothing to reward
    ]


@pytest.mark.parametrize("baseline", ["prompt", "zero"])
def test_red_rewards_from_the_op_on_a_padded_batch(baseline):
    torch.manual_seed(0)
    rollout = padded_batch()
    P = rollout.prompt_width
    hidden = torch.randn(4, rollout.input_ids.shape[1], 8)
    weight, bias = torch.randn(8), torch.randn(1)
    out = red_kernels.redistribute(hidden, weight, bias, attention_mask=rollout.attention_mask, response_start=P,
                                   baseline=baseline, backend="eager")
    red = red_rewards(out.token_rewards, P, rollout.response_mask)
    scores = hidden @ weight + bias
    for row, length in enumerate(rollout.lengths.tolist()):
        # The op's sequence reward is the score of the last response token (the last prompt token when empty).
        assert out.rewards[row] == pytest.approx(scores[row, P - 1 + length].item(), abs=1e-5)
        for t in range(5):
            if t >= length:
                assert red[row, t] == 0
                continue
            before = scores[row, P + t - 1] if (t > 0 or baseline == "prompt") else 0.0
            assert red[row, t].item() == pytest.approx((scores[row, P + t] - before).item(), abs=1e-5)
        # Return-equivalence: the token rewards telescope to the sequence reward.
        offset = scores[row, P - 1].item() if baseline == "prompt" else 0.0
        expected = out.rewards[row].item() - offset if length else 0.0
        assert red[row].sum().item() == pytest.approx(expected, abs=1e-4)


def test_mixed_rewards():
    torch.manual_seed(1)
    rollout = padded_batch()
    P = rollout.prompt_width
    token_rewards = torch.randn(4, rollout.input_ids.shape[1])
    scores = torch.tensor([1.0, -2.0, 0.5, 3.0])
    red = red_rewards(token_rewards, P, rollout.response_mask)
    sparse = sparse_rewards(scores, rollout.response_mask)
    assert torch.equal(mixed_rewards("sparse", scores, None, P, rollout.response_mask), sparse)
    assert torch.equal(mixed_rewards("red", scores, token_rewards, P, rollout.response_mask), red)
    mixed = mixed_rewards("red", scores, token_rewards, P, rollout.response_mask, beta_c=0.3)
    torch.testing.assert_close(mixed, 0.3 * red + 0.7 * sparse)
    assert mixed[3].abs().sum() == 0
    with pytest.raises(ValueError, match="mode"):
        mixed_rewards("dense", scores, token_rewards, P, rollout.response_mask)


def test_left_pad_rejects_an_empty_prompt():
    with pytest.raises(ValueError, match="empty prompt"):
        left_pad([[1, 2], []], PAD)
