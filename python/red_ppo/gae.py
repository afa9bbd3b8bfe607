"""Generalised advantage estimation over the response tokens."""

from __future__ import annotations

import torch


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns ``[B, R]``; the step after a row's last response token is terminal.

    ``values[:, t]`` is the critic's value of the state before response token t,
    ``rewards[:, t]`` the reward of token t. ``delta_t = r_t + gamma V_{t+1} - V_t`` and
    ``A_t = delta_t + gamma lam A_{t+1}``; returns are ``A + V``. Both are 0 on padding.
    """
    rewards = rewards * response_mask
    values = values * response_mask
    width = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(width)):
        next_value = values[:, t + 1] if t + 1 < width else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * response_mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * response_mask
