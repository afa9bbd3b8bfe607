"""Per-token rewards: sparse and RED placement, the KL penalty and its controllers, clipping
and whitening. All tensors are ``[B, R]`` over the response block, with a float
``response_mask`` that is 1 on response tokens (a prefix of each row).
"""

from __future__ import annotations

import torch

from red_kernels.reward_mix import check_reward_mix, mix_rewards


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked entries (0 when fewer than two)."""
    count = mask.sum()
    mean = masked_mean(values, mask)
    squares = (((values - mean) ** 2) * mask).sum()
    return squares / (count - 1) if count > 1 else squares * 0


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; with ``shift_mean=False`` the mean is kept."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def last_token_index(response_mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last response token; -1 for an empty response."""
    return response_mask.sum(1).long() - 1


def sparse_rewards(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """The sequence score ``[B]`` on each row's last response token; nothing for an empty response."""
    last = last_token_index(response_mask)
    rewards = torch.zeros_like(response_mask)
    rows = torch.nonzero(last >= 0).squeeze(1)
    rewards[rows, last[rows]] = scores[rows].to(rewards.dtype)
    return rewards


def red_rewards(token_rewards: torch.Tensor, prompt_width: int, response_mask: torch.Tensor) -> torch.Tensor:
    """The fused op's ``token_rewards [B, P + R]`` cut to the response block ``[B, R]``."""
    width = response_mask.shape[1]
    return token_rewards[:, prompt_width: prompt_width + width] * response_mask


def mixed_rewards(mode: str, scores: torch.Tensor, token_rewards: torch.Tensor | None, prompt_width: int,
                  response_mask: torch.Tensor, beta_c: float = 1.0) -> torch.Tensor:
    """Reward-model rewards per token: ``sparse``, or ``beta_c * red + (1 - beta_c) * sparse`` for ``red``
    (`red_kernels.reward_mix`)."""
    check_reward_mix({"mode": mode, "beta_c": beta_c})
    sparse = sparse_rewards(scores, response_mask)
    if mode == "sparse":
        return sparse
    return mix_rewards(red_rewards(token_rewards, prompt_width, response_mask), sparse, beta_c)


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate on sampled tokens: k1 = log p - log p_ref,
    k3 = (r - 1) - log r with r = p_ref / p (Schulman's unbiased, non-negative estimator)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"estimator: expected 'k1' or 'k3', got {estimator!r}")


class FixedKLController:
    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_samples: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019): move the coefficient toward ``target`` KL, at most 20% error per step."""

    def __init__(self, kl_coef: float, target: float, horizon: int) -> None:
        super().__init__(kl_coef)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon


def make_kl_controller(reward_cfg) -> FixedKLController:
    if reward_cfg.adaptive_kl:
        return AdaptiveKLController(reward_cfg.kl_coef, reward_cfg.target_kl, reward_cfg.kl_horizon)
    return FixedKLController(reward_cfg.kl_coef)


def apply_missing_eos_penalty(rm_rewards: torch.Tensor, no_eos: torch.Tensor, response_mask: torch.Tensor,
                              penalty: float | None) -> torch.Tensor:
    """Subtract ``penalty`` on the last token of every response without EOS (``no_eos [B]`` bool).
    It comes after ``reward.clip``, which applies to the reward model's scores only, so a penalty
    larger than the clip is not capped by it."""
    if penalty is None:
        return rm_rewards
    return rm_rewards - penalty * sparse_rewards(no_eos.to(rm_rewards.dtype), response_mask)


def shape_rewards(rm_rewards: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, kl_coef: float,
                  whiten_rewards: bool = False) -> torch.Tensor:
    """Final per-token rewards: the reward-model part (already clipped and penalised) minus
    ``kl_coef * kl``, optionally whitened."""
    rewards = (rm_rewards - kl_coef * kl) * response_mask
    if whiten_rewards:
        rewards = whiten(rewards, response_mask, shift_mean=False)
    return rewards
