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
    """Scores, rewards, token rewards and last index exactly as docs/spec.md section 2 defines them.

    ``weight`` is ``[H]``, ``bias`` a one-element tensor or None, ``attention_mask`` ``[B, T]``
    (nonzero = real token), ``response_start`` a ``[B]`` integer tensor (clamped to ``[0, T]``).
    Float outputs come out in ``compute_dtype`` (float32 for the op, float64 for tests).
    """
    B, T, _ = hidden.shape
    valid = attention_mask != 0
    positions = torch.arange(T, device=hidden.device)

    # Padding is zeroed before the product, not only after it: the weight's gradient sums
    # hidden over positions, and 0 * NaN there would be NaN (docs/spec.md: padding contributes exactly 0).
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


def row_dot(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``rows @ weight`` for ``rows`` ``[..., H]``, summed in a fixed pairwise order, so that a token's score does
    not depend on how many tokens share the call: a sequence-parallel shard scores its tokens bit for bit as the
    whole batch does (a matrix-vector product blocks rows, and splits H across threads when T is small)."""
    products = rows * weight
    width = 1 << max(products.shape[-1] - 1, 0).bit_length()
    products = F.pad(products, (0, width - products.shape[-1]))
    while width > 1:
        width //= 2
        products = products[..., :width] + products[..., width:]
    return products[..., 0]


def packed_layout(cu_seqlens: torch.Tensor, seq_lens: torch.Tensor, total: int):
    """Where each of ``total`` packed tokens lies: its slot (clamped to a valid index; 0 when N = 0), its position
    in that slot, and whether it is a real token (inside a slot, before that slot's ``seq_lens``)."""
    N = seq_lens.shape[0]
    device = cu_seqlens.device
    positions = torch.arange(total, device=device, dtype=torch.int64)
    if N == 0:
        zeros = torch.zeros(total, dtype=torch.int64, device=device)
        return zeros, zeros, torch.zeros(total, dtype=torch.bool, device=device)
    cu = cu_seqlens.to(torch.int64)
    sequence = torch.searchsorted(cu[1:].contiguous(), positions, right=True)  # N past the last slot
    seq = sequence.clamp(max=N - 1)
    position = positions - cu[seq]
    valid = (sequence < N) & (position < seq_lens.to(torch.int64)[seq])
    return seq, position, valid


def redistribute_varlen_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    seq_lens: torch.Tensor,
    response_start: torch.Tensor,
    prev_scores: torch.Tensor | None,
    baseline_zero: bool,
    compute_dtype: torch.dtype = torch.float32,
    fixed_order: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """docs/spec.md section 5 on packed tokens: ``hidden`` ``[T_local, H]``, ``cu_seqlens`` ``[N+1]`` slot offsets
    (validated), ``seq_lens`` ``[N]`` real tokens at the start of each slot (validated), ``response_start``
    ``[N]`` relative to each sequence's start (clamped to ``[0, seq_lens]``), ``prev_scores`` None or ``[N]``
    (NaN: no carried baseline). Differentiable in hidden, weight, bias and prev_scores.

    Each packed token gets section 2's rule with t its position in its slot; the first token of a sequence
    takes ``prev_scores[i]`` as its previous score when that is not NaN.
    """
    total, N = hidden.shape[0], seq_lens.shape[0]
    cu = cu_seqlens.to(torch.int64)
    lens = seq_lens.to(torch.int64)
    seq, position, valid = packed_layout(cu, lens, total)
    start = torch.minimum(response_start.to(torch.int64).clamp(min=0), lens)[seq] if N else position

    real_hidden = _copy_with_strides(hidden.to(compute_dtype)).masked_fill_(~valid.unsqueeze(-1), 0)
    # fixed_order=False: a plain matrix-vector product (faster, but a token's rounding depends on the call's shape;
    # the benchmarks' compile peer uses it, as a user writing this by hand would).
    weight = weight.to(compute_dtype).reshape(-1)
    scores = row_dot(real_hidden, weight) if fixed_order else real_hidden @ weight
    if bias is not None:
        scores = scores + bias.to(compute_dtype).reshape(())
    scores = torch.where(valid, scores, scores.new_zeros(()))

    has_token = lens > 0
    last_index = torch.where(has_token, cu[:-1] + lens - 1, -1)
    gathered = scores[last_index.clamp(min=0)] if total > 0 else scores.new_zeros(N)
    rewards = torch.where(has_token, gathered, gathered.new_zeros(()))

    in_response = valid & (position >= start)
    previous_score = F.pad(scores[:-1], (1, 0))
    # Token t-1 is in the same sequence exactly when t is not its sequence's first token.
    previous_counts = (position >= 1) & ((position - 1 >= start) | (not baseline_zero))
    baseline = torch.where(previous_counts, previous_score, previous_score.new_zeros(()))
    if prev_scores is not None and N > 0:
        carried = prev_scores.to(compute_dtype)[seq]
        use_carried = (position == 0) & ~torch.isnan(carried)
        baseline = torch.where(use_carried, carried, baseline)
    token_rewards = torch.where(in_response, scores - baseline, scores.new_zeros(()))
    return scores, rewards, token_rewards, last_index
