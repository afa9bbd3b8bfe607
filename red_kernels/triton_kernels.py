"""Triton kernels of the fused op (SPEC.md section 2): forward and backward.

Forward: `_scores_kernel` reads every real hidden row once and writes the scores; the tiny
`_token_rewards_kernel` then walks each row's [T] scores for the previous-score difference,
the last real index and the reward, so a block boundary never needs a second read of hidden.
Backward: `_backward_kernel` reads every real hidden row once, writing grad_hidden and a
per-block partial grad_weight in the same loop over H; the partials are summed in a fixed order.

The per-token rule restates csrc/red_rule.h in triton.language. Program ids are widened to
int64 before they multiply strides, so B*T*H beyond 2^31 works.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

_TILE = 4096  # elements of hidden per [BLOCK_T, BLOCK_H] tile
_MAX_BLOCK_T = 32
_MAX_SCAN_BLOCK = 1024  # positions per step of the [T] scan in _token_rewards_kernel


def _block_sizes(T: int, H: int) -> tuple[int, int, int]:
    """BLOCK_T, BLOCK_H and num_warps of a hidden tile: powers of two, capped at _TILE elements."""
    block_t = min(triton.next_power_of_2(T), _MAX_BLOCK_T)
    block_h = min(triton.next_power_of_2(H), _TILE // block_t)
    tile = block_t * block_h
    num_warps = 4 if tile >= 2048 else 2 if tile >= 512 else 1
    return block_t, block_h, num_warps


def _on_device(tensor: torch.Tensor):
    # Triton launches on the current CUDA device; make it the tensors' one.
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------
# Forward


@triton.jit
def _scores_kernel(
    hidden_ptr, weight_ptr, bias_ptr, mask_ptr, scores_ptr,
    T, H, stride_hb, stride_ht,
    HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = t < T
    valid = (tl.load(mask_ptr + b * T + t, mask=in_t, other=0) != 0) & in_t
    rows = hidden_ptr + b * stride_hb + t[:, None] * stride_ht
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        in_h = h < H
        w = tl.load(weight_ptr + h, mask=in_h, other=0.0)
        # Padding rows are never read: their score is the constant 0.
        x = tl.load(rows + h[None, :], mask=valid[:, None] & in_h[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x * w[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr)
    tl.store(scores_ptr + b * T + t, tl.where(valid, acc, 0.0), mask=in_t)


@triton.jit
def _token_rewards_kernel(
    scores_ptr, mask_ptr, start_ptr, rewards_ptr, token_rewards_ptr, last_index_ptr,
    T, BASELINE_ZERO: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    row = b * T
    start = tl.minimum(tl.maximum(tl.load(start_ptr + b), 0), T)
    last = tl.full([BLOCK], -1, dtype=tl.int64)
    for t0 in range(0, T, BLOCK):
        t = t0 + tl.arange(0, BLOCK).to(tl.int64)
        in_t = t < T
        has_prev = in_t & (t >= 1)
        valid = (tl.load(mask_ptr + row + t, mask=in_t, other=0) != 0) & in_t
        valid_prev = (tl.load(mask_ptr + row + t - 1, mask=has_prev, other=0) != 0) & has_prev
        score = tl.load(scores_ptr + row + t, mask=in_t, other=0.0)
        score_prev = tl.load(scores_ptr + row + t - 1, mask=has_prev, other=0.0)
        response = valid & (t >= start)
        if BASELINE_ZERO:  # the prompt's score counts as zero
            prev_counts = valid_prev & (t - 1 >= start)
        else:
            prev_counts = valid_prev
        reward = tl.where(response, score - tl.where(prev_counts, score_prev, 0.0), 0.0)
        tl.store(token_rewards_ptr + row + t, reward, mask=in_t)
        last = tl.maximum(last, tl.where(valid, t, -1))
    last_index = tl.max(last, axis=0)
    last_score = tl.load(scores_ptr + row + tl.maximum(last_index, 0))
    tl.store(rewards_ptr + b, tl.where(last_index >= 0, last_score, 0.0))
    tl.store(last_index_ptr + b, last_index)


def _check_layout(hidden, weight, mask, start, **more) -> None:
    """What the kernels index as dense memory must be so (the C++ ops check the same, csrc/redistribute.h).
    ``more``: name=(tensor, dtype, shape) of further inputs."""
    B, T, H = hidden.shape
    if H > 1 and hidden.stride(2) != 1:
        raise RuntimeError(f"hidden: expected unit innermost stride, got strides {hidden.stride()}")
    expected = {"weight": (weight, torch.float32, (H,)), "mask": (mask, torch.uint8, (B, T)),
                "start": (start, torch.int64, (B,)), **more}
    for name, (tensor, dtype, shape) in expected.items():
        if tensor.dtype != dtype or tuple(tensor.shape) != shape or not tensor.is_contiguous():
            raise RuntimeError(f"{name}: expected contiguous {dtype} {list(shape)}, got {tensor.dtype} "
                               f"{list(tensor.shape)} with strides {tensor.stride()}")


def redistribute_forward(hidden, weight, bias, mask, start, baseline_zero):
    """Scores, rewards, token rewards and last index of normalised inputs (see _library.py)."""
    _check_layout(hidden, weight, mask, start)
    B, T, H = hidden.shape
    device = hidden.device
    scores = torch.empty((B, T), dtype=torch.float32, device=device)
    rewards = torch.empty((B,), dtype=torch.float32, device=device)
    token_rewards = torch.empty((B, T), dtype=torch.float32, device=device)
    last_index = torch.empty((B,), dtype=torch.int64, device=device)
    if B == 0:
        return scores, rewards, token_rewards, last_index
    block_t, block_h, num_warps = _block_sizes(T, H)
    scan_block = min(triton.next_power_of_2(T), _MAX_SCAN_BLOCK)
    with _on_device(hidden):
        _scores_kernel[(B, triton.cdiv(T, block_t))](
            hidden, weight, bias, mask, scores, T, H, hidden.stride(0), hidden.stride(1),
            HAS_BIAS=bias is not None, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=num_warps,
        )
        _token_rewards_kernel[(B,)](
            scores, mask, start, rewards, token_rewards, last_index, T,
            BASELINE_ZERO=baseline_zero, BLOCK=scan_block, num_warps=4,
        )
    return scores, rewards, token_rewards, last_index


# ---------------------------------------------------------------------------------------
# Backward


@triton.jit
def _backward_kernel(
    grad_scores_ptr, grad_rewards_ptr, grad_token_ptr, hidden_ptr, weight_ptr, mask_ptr, start_ptr,
    last_index_ptr, grad_hidden_ptr, partial_weight_ptr, partial_bias_ptr,
    T, H, stride_hb, stride_ht, stride_gb, stride_gt,
    BASELINE_ZERO: tl.constexpr, NEED_HIDDEN: tl.constexpr, NEED_WEIGHT: tl.constexpr,
    NEED_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    block = b * tl.num_programs(1) + tl.program_id(1)  # this program's row of the partial sums
    t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    row = b * T
    in_t = t < T
    has_next = (t + 1) < T
    start = tl.minimum(tl.maximum(tl.load(start_ptr + b), 0), T)
    last_index = tl.load(last_index_ptr + b)

    # g[b,t] = d(loss)/d(scores[b,t]): score_gradient of csrc/red_rule.h.
    valid = (tl.load(mask_ptr + row + t, mask=in_t, other=0) != 0) & in_t
    valid_next = (tl.load(mask_ptr + row + t + 1, mask=has_next, other=0) != 0) & has_next
    g = tl.load(grad_scores_ptr + row + t, mask=in_t, other=0.0)
    g += tl.where(t == last_index, tl.load(grad_rewards_ptr + b), 0.0)
    g += tl.where(t >= start, tl.load(grad_token_ptr + row + t, mask=in_t, other=0.0), 0.0)
    if BASELINE_ZERO:  # scores[t] is token t+1's baseline only if t is a response token
        counts_for_next = valid_next & (t + 1 >= start) & (t >= start)
    else:
        counts_for_next = valid_next & (t + 1 >= start)
    g -= tl.where(counts_for_next, tl.load(grad_token_ptr + row + t + 1, mask=has_next, other=0.0), 0.0)
    g = tl.where(valid, g, 0.0)

    if NEED_BIAS:
        tl.store(partial_bias_ptr + block, tl.sum(g, axis=0))
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        in_h = h < H
        if NEED_HIDDEN:
            w = tl.load(weight_ptr + h, mask=in_h, other=0.0)
            out = grad_hidden_ptr + b * stride_gb + t[:, None] * stride_gt + h[None, :]
            dx = g[:, None] * w[None, :]
            tl.store(out, dx.to(grad_hidden_ptr.dtype.element_ty), mask=in_t[:, None] & in_h[None, :])
        if NEED_WEIGHT:
            rows = hidden_ptr + b * stride_hb + t[:, None] * stride_ht + h[None, :]
            x = tl.load(rows, mask=valid[:, None] & in_h[None, :], other=0.0).to(tl.float32)
            tl.store(partial_weight_ptr + block * H + h, tl.sum(g[:, None] * x, axis=0), mask=in_h)


def redistribute_backward(grad_scores, grad_rewards, grad_token_rewards, hidden, weight, mask, start,
                          last_index, baseline_zero, output_mask):
    """grad_hidden, grad_weight, grad_bias; an output not asked for is an empty tensor."""
    B, T, H = hidden.shape
    _check_layout(hidden, weight, mask, start, grad_scores=(grad_scores, torch.float32, (B, T)),
                  grad_rewards=(grad_rewards, torch.float32, (B,)),
                  grad_token_rewards=(grad_token_rewards, torch.float32, (B, T)),
                  last_index=(last_index, torch.int64, (B,)))
    need_hidden, need_weight, need_bias = (bool(flag) for flag in output_mask)
    device = hidden.device
    block_t, block_h, num_warps = _block_sizes(T, H)
    grid = (B, triton.cdiv(T, block_t))
    blocks = grid[0] * grid[1]
    grad_hidden = torch.empty((B, T, H) if need_hidden else (0,), dtype=hidden.dtype, device=device)
    partial_weight = torch.empty((blocks, H) if need_weight else (0,), dtype=torch.float32, device=device)
    partial_bias = torch.empty((blocks,) if need_bias else (0,), dtype=torch.float32, device=device)
    if blocks > 0 and (need_hidden or need_weight or need_bias):
        with _on_device(hidden):
            _backward_kernel[grid](
                grad_scores, grad_rewards, grad_token_rewards, hidden, weight, mask, start, last_index,
                grad_hidden, partial_weight, partial_bias,
                T, H, hidden.stride(0), hidden.stride(1), H * T, H,
                BASELINE_ZERO=baseline_zero, NEED_HIDDEN=need_hidden, NEED_WEIGHT=need_weight,
                NEED_BIAS=need_bias, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=num_warps,
            )
    # Partial sums in a fixed order: deterministic for a fixed launch configuration.
    if need_weight:
        grad_weight = partial_weight.sum(0)
    else:
        grad_weight = torch.empty((0,), dtype=torch.float32, device=device)
    if need_bias:
        grad_bias = partial_bias.sum(0, keepdim=True)
    else:
        grad_bias = torch.empty((0,), dtype=torch.float32, device=device)
    return grad_hidden, grad_weight, grad_bias
