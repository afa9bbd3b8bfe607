"""The PPO clipped policy loss, the clipped value loss, and their diagnostics."""

from __future__ import annotations

import torch

from red_ppo.rewards import masked_mean, masked_var


def token_mean(values: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """Masked sum over ``tokens`` (the masked mean when None). Dividing every micro-batch by the
    minibatch's token count makes the accumulated gradient that of the whole minibatch's mean."""
    if tokens is None:
        return masked_mean(values, mask)
    return (values * mask).sum() / tokens


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float,
                tokens: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))`` over response tokens, r = pi / pi_old
    (a sum divided by ``tokens`` when given; see `token_mean`)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = token_mean(torch.maximum(unclipped, clipped), mask, tokens)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float | None,
               tokens: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``0.5 * mean(max((V - R)^2, (clip(V, V_old +- eps) - R)^2))``; unclipped when ``clip_range`` is None
    (a sum divided by ``tokens`` when given; see `token_mean`)."""
    unclipped = (values - returns) ** 2
    if clip_range is None:
        return 0.5 * token_mean(unclipped, mask, tokens), {"clipfrac": unclipped.new_zeros(())}
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * token_mean(torch.maximum(unclipped, clipped), mask, tokens)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask)}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over response tokens (nan when the returns are constant)."""
    var_returns = masked_var(returns, mask)
    if var_returns.item() == 0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask) / var_returns)
