"""Triton kernels of the fused op (SPEC.md section 2): forward and backward.

Forward: `_scores_kernel` reads every real hidden row once and writes the scores; the tiny
`_token_rewards_kernel` then walks each row's [T] scores for the previous-score difference,
the last real index and the reward, so a block boundary never needs a second read of hidden.
Backward: in `_backward_kernel` each program owns one H tile and a run of positions of one batch
row (runs sized for one wave of 3 programs per SM), loads its weight tile once, reads hidden once,
writes grad_hidden, and keeps grad_weight in a [BLOCK_T, BLOCK_H] float32 accumulator that it
reduces once, into one row of a small [B x runs, H] partial; the partials are summed in a fixed order.

The forward indexes the B*T rows flat, so T = 1 or a T that is not a multiple of BLOCK_T wastes no
program. Launch geometry comes from `forward_launches` / `backward_launches`, which the host
functions run and tests/test_gpu_lowering.py compiles for sm_90 exactly as the JIT would.

The per-token rule restates csrc/red_rule.h in triton.language. Row indices are int64 before
they multiply strides, so B*T*H beyond 2^31 works.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import triton
import triton.language as tl

_TILE_BYTES = 8192  # bytes of hidden per [BLOCK_T, BLOCK_H] tile on the 16-byte-aligned path
# Scalar loads (rows not known 16-byte aligned, or H % 16 != 0): smaller tiles, and a shallower backward pipeline,
# keep those variants out of spills (bf16 backward at 4096 elements x 3 stages: 255 registers, 48 B of stack).
_TILE_UNALIGNED = 1024
_TILE_UNALIGNED_BACKWARD = 512
_NUM_STAGES_UNALIGNED_BACKWARD = 2
_MAX_BLOCK_T = 32
_MIN_BLOCK_T_BACKWARD = 16
_PROGRAMS_PER_SM = 4  # forward rows are split until this many programs per SM exist (or BLOCK_T is 1)
# Backward programs per SM: one wave of equal programs. tests/test_gpu_lowering.py checks that this
# many fit on an SM (registers, shared memory) for every aligned variant.
_BACKWARD_PROGRAMS_PER_SM = 3
_NUM_STAGES = 3  # cp.async pipeline depth of the H loop (forward) and the row loop (backward)
_MAX_SCAN_BLOCK = 1024  # positions per step of the [T] scan in _token_rewards_kernel
# SM count used on CPU tensors (the interpreter): small, so the tests' small shapes still split
# into several programs and the backward's row runs cross batch rows.
_INTERPRETER_SM_COUNT = 4


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch: what the host runs, and what the lowering test compiles."""

    kernel: object
    grid: tuple
    args: tuple
    constexprs: dict
    num_warps: int
    num_stages: int = 1

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def is_aligned(tensor: torch.Tensor) -> bool:
    """Whether the JIT will know ``tensor``'s rows are 16-byte aligned and H a multiple of the vector:
    it marks a pointer divisible by 16 bytes and an int divisible by 16 (elements, whatever the dtype),
    so that is the test; every other input takes the scalar-load variant."""
    return (tensor.data_ptr() % 16 == 0 and tensor.shape[-1] % 16 == 0
            and all(s % 16 == 0 for s in tensor.stride()[:-1]))


def _num_warps(tile: int) -> int:
    return 4 if tile >= 2048 else 2 if tile >= 512 else 1


def forward_config(rows: int, H: int, element_size: int, aligned: bool, sms: int) -> tuple[int, int, int]:
    """BLOCK_T, BLOCK_H, num_warps of the scores kernel: BLOCK_T halves (from 32) until there are
    _PROGRAMS_PER_SM programs per SM, so small batches still fill the GPU."""
    tile = _TILE_BYTES // element_size if aligned else _TILE_UNALIGNED
    block_t = _MAX_BLOCK_T
    while block_t > 1 and triton.cdiv(rows, block_t) < _PROGRAMS_PER_SM * sms:
        block_t //= 2
    block_h = min(triton.next_power_of_2(H), tile // block_t)
    return block_t, block_h, _num_warps(block_t * block_h)


def backward_config(B: int, T: int, H: int, element_size: int, aligned: bool, sms: int) -> tuple[int, int, int, int]:
    """BLOCK_T, BLOCK_H, num_warps of the backward, and how many runs each batch row is split into:
    as many as keep B x runs x H tiles within one wave of _BACKWARD_PROGRAMS_PER_SM programs per SM."""
    tile = _TILE_BYTES // element_size if aligned else _TILE_UNALIGNED_BACKWARD
    block_t = _MIN_BLOCK_T_BACKWARD
    block_h = min(triton.next_power_of_2(H), tile // block_t)
    h_tiles = triton.cdiv(H, block_h)
    runs = max(1, min(triton.cdiv(T, block_t), _BACKWARD_PROGRAMS_PER_SM * sms // (h_tiles * max(B, 1))))
    return block_t, block_h, _num_warps(block_t * block_h), runs


def _on_device(tensor: torch.Tensor):
    # Triton launches on the current CUDA device; make it the tensors' one.
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------
# Forward


@triton.jit
def _scores_kernel(
    hidden_ptr, weight_ptr, bias_ptr, mask_ptr, scores_ptr,
    rows, T, H, stride_hb, stride_ht,
    HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # flat row b*T + t
    in_r = r < rows
    b = r // T
    t = r - b * T
    valid = (tl.load(mask_ptr + r, mask=in_r, other=0) != 0) & in_r
    row_ptr = hidden_ptr + b * stride_hb + t * stride_ht
    # Sum in a 2-D float32 tile, reduced across lanes once after the loop.
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for h0 in tl.range(0, H, BLOCK_H, num_stages=NUM_STAGES):
        h = h0 + tl.arange(0, BLOCK_H)
        in_h = h < H
        # Padding rows are never read: their score is the constant 0.
        x = tl.load(row_ptr[:, None] + h[None, :], mask=valid[:, None] & in_h[None, :], other=0.0)
        w = tl.load(weight_ptr + h[None, :], mask=in_h[None, :], other=0.0)
        acc += x.to(tl.float32) * w
    score = tl.sum(acc, axis=1)
    if HAS_BIAS:
        score += tl.load(bias_ptr)
    tl.store(scores_ptr + r, tl.where(valid, score, 0.0), mask=in_r)


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


def forward_launches(hidden, weight, bias, mask, start, baseline_zero, outputs, sms: int) -> list[Launch]:
    """The forward's two launches on normalised inputs, writing ``outputs`` (scores, rewards,
    token_rewards, last_index)."""
    B, T, H = hidden.shape
    scores, rewards, token_rewards, last_index = outputs
    block_t, block_h, num_warps = forward_config(B * T, H, hidden.element_size(), is_aligned(hidden), sms)
    scan_block = min(triton.next_power_of_2(T), _MAX_SCAN_BLOCK)
    return [
        Launch(_scores_kernel, (triton.cdiv(B * T, block_t),),
               (hidden, weight, bias, mask, scores, B * T, T, H, hidden.stride(0), hidden.stride(1)),
               dict(HAS_BIAS=bias is not None, BLOCK_T=block_t, BLOCK_H=block_h, NUM_STAGES=_NUM_STAGES),
               num_warps),
        Launch(_token_rewards_kernel, (B,), (scores, mask, start, rewards, token_rewards, last_index, T),
               dict(BASELINE_ZERO=baseline_zero, BLOCK=scan_block), 4),
    ]


def redistribute_forward(hidden, weight, bias, mask, start, baseline_zero):
    """Scores, rewards, token rewards and last index of normalised inputs (see _library.py)."""
    _check_layout(hidden, weight, mask, start)
    B, T, H = hidden.shape
    device = hidden.device
    outputs = (torch.empty((B, T), dtype=torch.float32, device=device),
               torch.empty((B,), dtype=torch.float32, device=device),
               torch.empty((B, T), dtype=torch.float32, device=device),
               torch.empty((B,), dtype=torch.int64, device=device))
    if B > 0:
        with _on_device(hidden):
            for launch in forward_launches(hidden, weight, bias, mask, start, baseline_zero, outputs,
                                           sm_count(device)):
                launch()
    return outputs


# ---------------------------------------------------------------------------------------
# Backward


@triton.jit
def _backward_kernel(
    grad_scores_ptr, grad_rewards_ptr, grad_token_ptr, hidden_ptr, weight_ptr, mask_ptr, start_ptr,
    last_index_ptr, grad_hidden_ptr, partial_weight_ptr, partial_bias_ptr,
    T, H, runs_per_row, rows_per_run, stride_hb, stride_ht,
    BASELINE_ZERO: tl.constexpr, NEED_HIDDEN: tl.constexpr, NEED_WEIGHT: tl.constexpr,
    NEED_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    run = tl.program_id(0)  # this program's row of the partial sums
    b = (run // runs_per_row).to(tl.int64)
    first = (run % runs_per_row).to(tl.int64) * rows_per_run
    end = tl.minimum(first + rows_per_run, T)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = h < H
    w = tl.load(weight_ptr + h, mask=in_h, other=0.0)
    row = b * T
    start = tl.minimum(tl.maximum(tl.load(start_ptr + b), 0), T)
    last_index = tl.load(last_index_ptr + b)
    grad_reward = tl.load(grad_rewards_ptr + b)
    acc_w = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_T], dtype=tl.float32)
    for t0 in tl.range(first, end, BLOCK_T, num_stages=NUM_STAGES):
        t = t0 + tl.arange(0, BLOCK_T)
        in_t = t < end
        valid = (tl.load(mask_ptr + row + t, mask=in_t, other=0) != 0) & in_t
        if NEED_WEIGHT:  # issued first: its DRAM round trip overlaps everything below
            x = tl.load(hidden_ptr + b * stride_hb + t[:, None] * stride_ht + h[None, :],
                        mask=valid[:, None] & in_h[None, :], other=0.0)
        # g[b,t] = d(loss)/d(scores[b,t]): score_gradient of csrc/red_rule.h.
        has_next = (t + 1) < T
        valid_next = (tl.load(mask_ptr + row + t + 1, mask=has_next, other=0) != 0) & has_next
        g = tl.load(grad_scores_ptr + row + t, mask=in_t, other=0.0)
        g += tl.where(t == last_index, grad_reward, 0.0)
        g += tl.where(t >= start, tl.load(grad_token_ptr + row + t, mask=in_t, other=0.0), 0.0)
        if BASELINE_ZERO:  # scores[t] is token t+1's baseline only if t is a response token
            counts_for_next = valid_next & (t + 1 >= start) & (t >= start)
        else:
            counts_for_next = valid_next & (t + 1 >= start)
        g -= tl.where(counts_for_next, tl.load(grad_token_ptr + row + t + 1, mask=has_next, other=0.0), 0.0)
        g = tl.where(valid, g, 0.0)
        if NEED_HIDDEN:  # grad_hidden is contiguous [B, T, H]
            dx = g[:, None] * w[None, :]
            tl.store(grad_hidden_ptr + (row + t[:, None]) * H + h[None, :], dx.to(grad_hidden_ptr.dtype.element_ty),
                     mask=in_t[:, None] & in_h[None, :])
        if NEED_WEIGHT:
            acc_w += g[:, None] * x.to(tl.float32)
        if NEED_BIAS:
            acc_b += g
    if NEED_WEIGHT:
        tl.store(partial_weight_ptr + run.to(tl.int64) * H + h, tl.sum(acc_w, axis=0), mask=in_h)
    if NEED_BIAS:
        if tl.program_id(1) == 0:
            tl.store(partial_bias_ptr + run, tl.sum(acc_b, axis=0))


def _backward_runs(B: int, T: int, H: int, element_size: int, aligned: bool, sms: int) -> tuple[int, int]:
    """Runs per batch row and rows per run: each program takes one run of one batch row."""
    block_t, block_h, _, runs = backward_config(B, T, H, element_size, aligned, sms)
    rows_per_run = triton.cdiv(triton.cdiv(T, block_t), runs) * block_t
    return triton.cdiv(T, rows_per_run), rows_per_run


def backward_partial_rows(hidden: torch.Tensor, sms: int) -> int:
    """Rows of the float32 partial sums the backward writes for ``hidden``: B x runs per batch row."""
    B, T, H = hidden.shape
    return B * _backward_runs(B, T, H, hidden.element_size(), is_aligned(hidden), sms)[0]


def backward_launches(grads, hidden, weight, mask, start, last_index, baseline_zero, output_mask, outputs,
                      sms: int) -> list[Launch]:
    """The backward's launch on normalised inputs, writing ``outputs`` (grad_hidden, partial_weight,
    partial_bias); empty when nothing is asked for."""
    B, T, H = hidden.shape
    need_hidden, need_weight, need_bias = output_mask
    grad_hidden, partial_weight, partial_bias = outputs
    if B == 0 or not (need_hidden or need_weight or need_bias):
        return []
    aligned = is_aligned(hidden)
    block_t, block_h, num_warps, _ = backward_config(B, T, H, hidden.element_size(), aligned, sms)
    runs_per_row, rows_per_run = _backward_runs(B, T, H, hidden.element_size(), aligned, sms)
    h_tiles = triton.cdiv(H, block_h) if need_hidden or need_weight else 1
    return [Launch(_backward_kernel, (B * runs_per_row, h_tiles),
                   (*grads, hidden, weight, mask, start, last_index, grad_hidden, partial_weight, partial_bias,
                    T, H, runs_per_row, rows_per_run, hidden.stride(0), hidden.stride(1)),
                   dict(BASELINE_ZERO=baseline_zero, NEED_HIDDEN=need_hidden, NEED_WEIGHT=need_weight,
                        NEED_BIAS=need_bias, BLOCK_T=block_t, BLOCK_H=block_h,
                        NUM_STAGES=_NUM_STAGES if aligned else _NUM_STAGES_UNALIGNED_BACKWARD),
                   num_warps)]


def redistribute_backward(grad_scores, grad_rewards, grad_token_rewards, hidden, weight, mask, start,
                          last_index, baseline_zero, output_mask):
    """grad_hidden, grad_weight, grad_bias; an output not asked for is an empty tensor."""
    B, T, H = hidden.shape
    _check_layout(hidden, weight, mask, start, grad_scores=(grad_scores, torch.float32, (B, T)),
                  grad_rewards=(grad_rewards, torch.float32, (B,)),
                  grad_token_rewards=(grad_token_rewards, torch.float32, (B, T)),
                  last_index=(last_index, torch.int64, (B,)))
    need = tuple(bool(flag) for flag in output_mask)
    device = hidden.device
    sms = sm_count(device)
    runs = backward_partial_rows(hidden, sms)
    outputs = (torch.empty((B, T, H) if need[0] else (0,), dtype=hidden.dtype, device=device),
               torch.empty((runs, H) if need[1] else (0,), dtype=torch.float32, device=device),
               torch.empty((runs,) if need[2] else (0,), dtype=torch.float32, device=device))
    with _on_device(hidden):
        for launch in backward_launches((grad_scores, grad_rewards, grad_token_rewards), hidden, weight, mask,
                                        start, last_index, baseline_zero, need, outputs, sms):
            launch()
    grad_hidden, partial_weight, partial_bias = outputs
    # Partial sums in a fixed order: deterministic for a fixed launch configuration.
    grad_weight = partial_weight.sum(0) if need[1] else torch.empty((0,), dtype=torch.float32, device=device)
    grad_bias = partial_bias.sum(0, keepdim=True) if need[2] else torch.empty((0,), dtype=torch.float32, device=device)
    return grad_hidden, grad_weight, grad_bias
