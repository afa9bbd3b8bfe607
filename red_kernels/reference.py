"""The eager reference of the fused op: plain PyTorch, written to be read.

Every backend is tested against this function (evaluated in float64), and the
benchmarks time it as the "eager" provider. Autograd differentiates it directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _copy_with_strides(x: torch.Tensor) -> torch.Tensor:
    """A differentiable copy of ``x`` with its strides, gaps included, so that a product runs the
    same kernel (and rounds the same way) on the copy as on ``x`` itself."""
    order = sorted(range(x.dim()), key=lambda d: x.stride(d), reverse=True)
    gapped = all(x.stride(a) >= x.stride(b) * x.size(b) > 0 for a, b in zip(order, order[1:]))
    if x.is_contiguous() or not gapped:  # clone keeps the strides of any dense layout
        return x.clone()
    return torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=x.device).copy_(x)


def redistribute_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    attention_mask: torch.Tensor,
    response_start: torch.Tensor,
    baseline_zero: bool,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores, rewards, token rewards and last index exactly as SPEC.md section 2 defines them.

    ``weight`` is ``[H]``, ``bias`` a one-element tensor or None, ``attention_mask`` ``[B, T]``
    (nonzero = real token), ``response_start`` a ``[B]`` integer tensor (clamped to ``[0, T]``).
    Float outputs come out in ``compute_dtype`` (float32 for the op, float64 for tests).
    """
    B, T, _ = hidden.shape
    valid = attention_mask != 0
    positions = torch.arange(T, device=hidden.device)

    # Padding is zeroed before the product, not only after it: the weight's gradient sums
    # hidden over positions, and 0 * NaN there would be NaN (SPEC: padding contributes exactly 0).
    real_hidden = _copy_with_strides(hidden.to(compute_dtype)).masked_fill_(~valid.unsqueeze(-1), 0)
    scores = real_hidden @ weight.to(compute_dtype).reshape(-1)
    if bias is not None:
        scores = scores + bias.to(compute_dtype).reshape(())
    scores = torch.where(valid, scores, scores.new_zeros(()))

    last_index = torch.where(valid, positions, -1).amax(dim=1)
    gathered = scores.gather(1, last_index.clamp(min=0).unsqueeze(1)).squeeze(1)
    rewards = torch.where(last_index >= 0, gathered, gathered.new_zeros(()))

    start = response_start.to(torch.int64).clamp(0, T).unsqueeze(1)
    in_response = valid & (positions >= start)
    previous_score = F.pad(scores[:, :-1], (1, 0))
    previous_valid = F.pad(valid[:, :-1], (1, 0), value=False)
    # The previous score is the baseline unless it is a prompt score under baseline="zero".
    previous_counts = previous_valid & ((positions - 1 >= start) | (not baseline_zero))
    baseline = torch.where(previous_counts, previous_score, previous_score.new_zeros(()))
    token_rewards = torch.where(in_response, scores - baseline, scores.new_zeros(()))
    return scores, rewards, token_rewards, last_index
