"""Triton kernels of the fused op (docs/spec.md section 2): forward and backward.

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

Packed sequences (redistribute_varlen, docs/spec.md section 5) run the same kernels with PACKED set: the
T_local tokens are one flat row, and a token's slot, position and validity come from a branch-free binary
search over cu_seqlens (`_packed_rows`) instead of the mask. The backward's loop stays the padded one:
`_packed_gradient_kernel` first writes each token's mask and score gradient, which it then reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

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
# Registers per thread the 16-bit four-warp backward may take (Triton's maxnreg): 65536 / (168 * 128) keeps
# _BACKWARD_PROGRAMS_PER_SM programs on an SM. Triton 3.6 (what torch 2.11 installs) gives that variant 157-177
# registers at sm_90 (2 programs at B=8 T=1024 H=4096) and 193 at sm_80; capped, 160-161, no spills; Triton
# 3.8 gives it 128-135 by itself and 122-124 capped. (The interpreter-only bf16 rounding, ROUND_BF16, would add
# 5-7 capped: 165 at sm_90 and sm_80 under 3.6, 128-131 under 3.8; it is not compiled for a GPU.) Only there:
# a cap on every variant let 3.8 grow the float32 backward from 113 to 135 registers (4 -> 3 programs), and 136
# made 3.6 spill 8 bytes in the unaligned bf16 one (tests/test_gpu_lowering.py runs under both versions).
_BACKWARD_MAX_REGISTERS_16BIT = 168
_NUM_STAGES = 3  # cp.async pipeline depth of the H loop (forward) and the row loop (backward)
_MAX_SCAN_BLOCK = 1024  # positions per step of the [T] scan in _token_rewards_kernel
_PACKED_GRADIENT_BLOCK = 1024  # packed tokens per program of _packed_gradient_kernel
# SM count used on CPU tensors (the interpreter): small, so the tests' small shapes still split
# into several programs and the backward's row runs cross batch rows.
_INTERPRETER_SM_COUNT = 4


def _backward_max_registers(element_size: int, num_warps: int) -> int | None:
    return _BACKWARD_MAX_REGISTERS_16BIT if element_size == 2 and num_warps == 4 else None


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch: what the host runs, and what the lowering test compiles."""

    kernel: object
    grid: tuple
    args: tuple
    constexprs: dict
    num_warps: int
    num_stages: int = 1
    max_registers: int | None = None  # ptxas's cap per thread (Triton's maxnreg); None: the compiler's choice

    def options(self) -> dict:
        """The launch options besides the constexprs, as the JIT takes them."""
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.max_registers is not None:
            options["maxnreg"] = self.max_registers
        return options

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, **self.options())


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
def _packed_rows(r, in_r, cu_ptr, lens_ptr, N, SEARCH_STEPS: tl.constexpr):
    """Of packed tokens ``r``: their slot (N past cu_seqlens[-1]), position in it, and whether they are real.
    The slot is the largest i in [0, N] with cu_seqlens[i] <= r: a branch-free binary search over
    cu_seqlens, unrolled (SEARCH_STEPS = N's bit length), so the loops it sits in stay flat for the pipeliner."""
    seq = tl.zeros_like(r)
    for k in tl.static_range(SEARCH_STEPS):
        probe = seq + (1 << (SEARCH_STEPS - 1 - k))
        ok = probe <= N
        seq = tl.where(ok & (tl.load(cu_ptr + probe, mask=ok, other=0) <= r), probe, seq)
    inside = seq < N
    position = r - tl.load(cu_ptr + seq)
    valid = inside & in_r & (position < tl.load(lens_ptr + seq, mask=inside, other=0))
    return seq, position, valid


@triton.jit
def _scores_kernel(
    hidden_ptr, weight_ptr, bias_ptr, mask_ptr, scores_ptr,
    rows, T, H, stride_hb, stride_ht, cu_ptr, lens_ptr, N,
    HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, NUM_STAGES: tl.constexpr,
    PACKED: tl.constexpr = False, SEARCH_STEPS: tl.constexpr = 0,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # flat row b*T + t, or packed token
    in_r = r < rows
    if PACKED:
        _, _, valid = _packed_rows(r, in_r, cu_ptr, lens_ptr, N, SEARCH_STEPS)
        row_ptr = hidden_ptr + r * stride_ht
    else:
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
    T, cu_ptr, lens_ptr, prev_ptr, N, BASELINE_ZERO: tl.constexpr, BLOCK: tl.constexpr,
    PACKED: tl.constexpr = False, HAS_PREV: tl.constexpr = False,
):
    b = tl.program_id(0).to(tl.int64)
    if PACKED:  # program b walks slot b, [cu[b], cu[b+1]); program N the padding past cu[N], up to T tokens
        is_slot = b < N
        row = tl.load(cu_ptr + b)
        slot = tl.where(is_slot, tl.load(cu_ptr + b + 1, mask=is_slot, other=0), T) - row
        length = tl.load(lens_ptr + b, mask=is_slot, other=0)
        start = tl.minimum(tl.maximum(tl.load(start_ptr + b, mask=is_slot, other=0), 0), length)
        if HAS_PREV:
            carried = tl.load(prev_ptr + b, mask=is_slot, other=float("nan"))
    else:
        row = b * T
        slot = T
        start = tl.minimum(tl.maximum(tl.load(start_ptr + b), 0), T)
    last = tl.full([BLOCK], -1, dtype=tl.int64)
    for t0 in range(0, slot, BLOCK):
        t = t0 + tl.arange(0, BLOCK).to(tl.int64)
        in_t = t < slot
        has_prev = in_t & (t >= 1)
        if PACKED:  # a slot's real tokens are its first `length`
            valid = in_t & (t < length)
            valid_prev = has_prev & (t <= length)
        else:
            valid = (tl.load(mask_ptr + row + t, mask=in_t, other=0) != 0) & in_t
            valid_prev = (tl.load(mask_ptr + row + t - 1, mask=has_prev, other=0) != 0) & has_prev
        score = tl.load(scores_ptr + row + t, mask=in_t, other=0.0)
        score_prev = tl.load(scores_ptr + row + t - 1, mask=has_prev, other=0.0)
        response = valid & (t >= start)
        if BASELINE_ZERO:  # the prompt's score counts as zero
            prev_counts = valid_prev & (t - 1 >= start)
        else:
            prev_counts = valid_prev
        if HAS_PREV:  # a carried baseline (not NaN) is the first token's previous score
            carry = t + tl.where(carried == carried, 0, 1) == 0  # t == 0 and not NaN
            prev_counts = prev_counts | carry
            score_prev = tl.where(carry, carried, score_prev)
        reward = tl.where(response, score - tl.where(prev_counts, score_prev, 0.0), 0.0)
        tl.store(token_rewards_ptr + row + t, reward, mask=in_t)
        last = tl.maximum(last, tl.where(valid, t, -1))
    last_index = tl.max(last, axis=0)
    if PACKED:  # last_index is the absolute packed position; the padding program writes no sequence
        found = last_index >= 0
        last_score = tl.load(scores_ptr + row + tl.maximum(last_index, 0), mask=found, other=0.0)
        tl.store(rewards_ptr + b, tl.where(found, last_score, 0.0), mask=is_slot)
        tl.store(last_index_ptr + b, tl.where(found, row + last_index, -1), mask=is_slot)
    else:
        last_score = tl.load(scores_ptr + row + tl.maximum(last_index, 0))
        tl.store(rewards_ptr + b, tl.where(last_index >= 0, last_score, 0.0))
        tl.store(last_index_ptr + b, last_index)


def _check_layout(hidden, **inputs) -> None:
    """What the kernels index as dense memory must be so (the C++ ops check the same, csrc/redistribute.h): hidden
    (``[B, T, H]`` or packed ``[T, H]``) with unit innermost stride, and each of ``inputs``, given as
    name=(tensor, dtype, shape), contiguous with that dtype and shape."""
    if hidden.shape[-1] > 1 and hidden.stride(-1) != 1:
        raise RuntimeError(f"hidden: expected unit innermost stride, got strides {hidden.stride()}")
    for name, (tensor, dtype, shape) in inputs.items():
        if tensor.dtype != dtype or tuple(tensor.shape) != shape or not tensor.is_contiguous():
            raise RuntimeError(f"{name}: expected contiguous {dtype} {list(shape)}, got {tensor.dtype} "
                               f"{list(tensor.shape)} with strides {tensor.stride()}")


def _padded_layout(hidden, weight, mask, start) -> dict:
    """`_check_layout`'s inputs of the padded op: weight, mask and start."""
    B, T, H = hidden.shape
    return dict(weight=(weight, torch.float32, (H,)), mask=(mask, torch.uint8, (B, T)),
                start=(start, torch.int64, (B,)))


def forward_launches(hidden, weight, bias, mask, start, baseline_zero, outputs, sms: int) -> list[Launch]:
    """The forward's two launches on normalised inputs, writing ``outputs`` (scores, rewards,
    token_rewards, last_index)."""
    B, T, H = hidden.shape
    scores, rewards, token_rewards, last_index = outputs
    block_t, block_h, num_warps = forward_config(B * T, H, hidden.element_size(), is_aligned(hidden), sms)
    scan_block = min(triton.next_power_of_2(T), _MAX_SCAN_BLOCK)
    return [
        Launch(_scores_kernel, (triton.cdiv(B * T, block_t),),
               (hidden, weight, bias, mask, scores, B * T, T, H, hidden.stride(0), hidden.stride(1), None, None, None),
               dict(HAS_BIAS=bias is not None, BLOCK_T=block_t, BLOCK_H=block_h, NUM_STAGES=_NUM_STAGES),
               num_warps),
        Launch(_token_rewards_kernel, (B,),
               (scores, mask, start, rewards, token_rewards, last_index, T, None, None, None, None),
               dict(BASELINE_ZERO=baseline_zero, BLOCK=scan_block), 4),
    ]


def redistribute_forward(hidden, weight, bias, mask, start, baseline_zero):
    """Scores, rewards, token rewards and last index of normalised inputs (see _library.py)."""
    _check_layout(hidden, **_padded_layout(hidden, weight, mask, start))
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
def _score_gradient(grad_scores_ptr, grad_token_ptr, i, in_i, position, start, valid, valid_next, has_next,
                    last_index, grad_reward, BASELINE_ZERO: tl.constexpr):
    """g = d(loss)/d(scores) of tokens ``i`` (score_gradient of csrc/red_rule.h); ``position`` in the row or slot,
    ``valid_next``: token i+1 is real and of the same row (``has_next``: it may be read)."""
    g = tl.load(grad_scores_ptr + i, mask=in_i, other=0.0)
    g += tl.where(i == last_index, grad_reward, 0.0)
    g += tl.where(position >= start, tl.load(grad_token_ptr + i, mask=in_i, other=0.0), 0.0)
    if BASELINE_ZERO:  # scores[t] is token t+1's baseline only if t is a response token
        counts_for_next = valid_next & (position + 1 >= start) & (position >= start)
    else:
        counts_for_next = valid_next & (position + 1 >= start)
    g -= tl.where(counts_for_next, tl.load(grad_token_ptr + i + 1, mask=has_next, other=0.0), 0.0)
    return tl.where(valid, g, 0.0)


def _interpreted() -> bool:
    """Whether the kernels run under the Triton interpreter, whose float32 -> bfloat16 cast truncates where a GPU's
    (cvt.rn) rounds to nearest even: the backward then rounds its bf16 grad_hidden itself (ROUND_BF16), so both
    give the same bits; compiled for a GPU the explicit rounding, about 220 instructions in the backward's loop
    and 5-7 registers, is left out."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _to_bfloat16_nearest_even(x):
    """float32 -> bfloat16 rounded to nearest, ties to even, in integer arithmetic: what a GPU's cvt.rn gives,
    where the Triton interpreter's cast truncates. NaN stays NaN (quieted), infinities stay infinities."""
    bits = x.to(tl.uint32, bitcast=True)
    upper = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    upper = tl.where(x != x, (bits >> 16) | 0x40, upper)
    return upper.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _packed_gradient_kernel(
    grad_scores_ptr, grad_rewards_ptr, grad_token_ptr, cu_ptr, lens_ptr, start_ptr, last_index_ptr, mask_ptr, g_ptr,
    T, N, BASELINE_ZERO: tl.constexpr, SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per packed token: whether it is real (mask, uint8) and its score gradient g, for _backward_kernel's PACKED loop."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_i = i < T
    seq, position, valid = _packed_rows(i, in_i, cu_ptr, lens_ptr, N, SEARCH_STEPS)
    length = tl.load(lens_ptr + seq, mask=valid, other=0)
    start = tl.minimum(tl.maximum(tl.load(start_ptr + seq, mask=valid, other=0), 0), length)
    last_index = tl.load(last_index_ptr + seq, mask=valid, other=-1)  # absolute, as i
    grad_reward = tl.load(grad_rewards_ptr + seq, mask=valid, other=0.0)
    valid_next = valid & (position + 1 < length)
    g = _score_gradient(grad_scores_ptr, grad_token_ptr, i, in_i, position, start, valid, valid_next, valid_next,
                        last_index, grad_reward, BASELINE_ZERO)
    tl.store(mask_ptr + i, valid.to(tl.uint8), mask=in_i)
    tl.store(g_ptr + i, g, mask=in_i)


@triton.jit
def _backward_kernel(
    grad_scores_ptr, grad_rewards_ptr, grad_token_ptr, hidden_ptr, weight_ptr, mask_ptr, start_ptr,
    last_index_ptr, grad_hidden_ptr, partial_weight_ptr, partial_bias_ptr,
    T, H, runs_per_row, rows_per_run, stride_hb, stride_ht, g_ptr,
    BASELINE_ZERO: tl.constexpr, NEED_HIDDEN: tl.constexpr, NEED_WEIGHT: tl.constexpr,
    NEED_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, NUM_STAGES: tl.constexpr,
    PACKED: tl.constexpr = False, ROUND_BF16: tl.constexpr = False,
):
    # PACKED: the T packed tokens are one row (b = 0); mask_ptr and g_ptr hold _packed_gradient_kernel's
    # per-token mask and score gradient, so the loop stays as flat for the pipeliner as the padded one.
    run = tl.program_id(0)  # this program's row of the partial sums
    b = (run // runs_per_row).to(tl.int64)
    first = (run % runs_per_row).to(tl.int64) * rows_per_run
    end = tl.minimum(first + rows_per_run, T)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = h < H
    w = tl.load(weight_ptr + h, mask=in_h, other=0.0)
    row = b * T
    if not PACKED:
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
        if PACKED:
            g = tl.load(g_ptr + t, mask=in_t, other=0.0)
        else:
            has_next = (t + 1) < T
            valid_next = (tl.load(mask_ptr + row + t + 1, mask=has_next, other=0) != 0) & has_next
            g = _score_gradient(grad_scores_ptr + row, grad_token_ptr + row, t, in_t, t, start, valid, valid_next,
                                has_next, last_index, grad_reward, BASELINE_ZERO)
        if NEED_HIDDEN:  # grad_hidden is contiguous [B, T, H] ([T, H] packed)
            dx = g[:, None] * w[None, :]
            if ROUND_BF16 and grad_hidden_ptr.dtype.element_ty == tl.bfloat16:  # the interpreter's cast truncates
                dx = _to_bfloat16_nearest_even(dx)
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
                    T, H, runs_per_row, rows_per_run, hidden.stride(0), hidden.stride(1), None),
                   dict(BASELINE_ZERO=baseline_zero, NEED_HIDDEN=need_hidden, NEED_WEIGHT=need_weight,
                        NEED_BIAS=need_bias, BLOCK_T=block_t, BLOCK_H=block_h,
                        NUM_STAGES=_NUM_STAGES if aligned else _NUM_STAGES_UNALIGNED_BACKWARD,
                        ROUND_BF16=_interpreted()),
                   num_warps, max_registers=_backward_max_registers(hidden.element_size(), num_warps))]


def redistribute_backward(grad_scores, grad_rewards, grad_token_rewards, hidden, weight, mask, start,
                          last_index, baseline_zero, output_mask):
    """grad_hidden, grad_weight, grad_bias; an output not asked for is an empty tensor."""
    B, T, H = hidden.shape
    _check_layout(hidden, **_padded_layout(hidden, weight, mask, start),
                  grad_scores=(grad_scores, torch.float32, (B, T)),
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


# ---------------------------------------------------------------------------------------
# Packed sequences (docs/spec.md section 5): the same kernels with PACKED set. The packed tokens are one flat
# row of T_local: the scores kernel and the backward take their programs' rows exactly as for a [1, T, H]
# batch, and each token's slot, position and validity come from _packed_rows over cu_seqlens / seq_lens
# instead of the mask; the token-rewards kernel walks one slot per program (and one more for the padding
# past cu_seqlens[-1]), with a slot's first seq_lens tokens real.


def _packed_layout(hidden, weight, cu_seqlens, seq_lens, start) -> dict:
    """`_check_layout`'s inputs of the packed op: weight, cu_seqlens, seq_lens and start."""
    H = hidden.shape[1]
    N = seq_lens.shape[0]
    return dict(weight=(weight, torch.float32, (H,)), cu_seqlens=(cu_seqlens, torch.int64, (N + 1,)),
                seq_lens=(seq_lens, torch.int64, (N,)), start=(start, torch.int64, (N,)))


def _packed_constexprs(N: int) -> dict:
    return dict(PACKED=True, SEARCH_STEPS=N.bit_length())


def varlen_forward_launches(hidden, weight, bias, cu_seqlens, seq_lens, start, prev_scores, baseline_zero, outputs,
                            sms: int) -> list[Launch]:
    """The varlen forward's two launches on normalised inputs, writing ``outputs`` (scores, rewards,
    token_rewards, last_index): `forward_launches` of a [1, T_local, H] batch, PACKED."""
    total, H = hidden.shape
    N = seq_lens.shape[0]
    scores, rewards, token_rewards, last_index = outputs
    block_t, block_h, num_warps = forward_config(total, H, hidden.element_size(), is_aligned(hidden), sms)
    scan_block = min(triton.next_power_of_2(max(total, 1)), _MAX_SCAN_BLOCK)
    return [
        Launch(_scores_kernel, (triton.cdiv(total, block_t),),
               (hidden, weight, bias, None, scores, total, total, H, 0, hidden.stride(0), cu_seqlens, seq_lens, N),
               dict(HAS_BIAS=bias is not None, BLOCK_T=block_t, BLOCK_H=block_h, NUM_STAGES=_NUM_STAGES,
                    **_packed_constexprs(N)),
               num_warps),
        Launch(_token_rewards_kernel, (N + 1,),
               (scores, None, start, rewards, token_rewards, last_index, total, cu_seqlens, seq_lens, prev_scores,
                N),
               dict(BASELINE_ZERO=baseline_zero, BLOCK=scan_block, PACKED=True, HAS_PREV=prev_scores is not None),
               4),
    ]


def redistribute_varlen_forward(hidden, weight, bias, cu_seqlens, seq_lens, start, prev_scores, baseline_zero):
    """Scores, rewards, token rewards and last index of normalised packed inputs (see _library.py)."""
    N = seq_lens.shape[0]
    more = {} if prev_scores is None else {"prev_scores": (prev_scores, torch.float32, (N,))}
    _check_layout(hidden, **_packed_layout(hidden, weight, cu_seqlens, seq_lens, start), **more)
    total = hidden.shape[0]
    device = hidden.device
    outputs = (torch.empty((total,), dtype=torch.float32, device=device),
               torch.empty((N,), dtype=torch.float32, device=device),
               torch.empty((total,), dtype=torch.float32, device=device),
               torch.empty((N,), dtype=torch.int64, device=device))
    if total > 0 or N > 0:
        with _on_device(hidden):
            for launch in varlen_forward_launches(hidden, weight, bias, cu_seqlens, seq_lens, start, prev_scores,
                                                  baseline_zero, outputs, sm_count(device)):
                if launch.grid[0] > 0:
                    launch()
    return outputs


def varlen_backward_partial_rows(hidden: torch.Tensor, sms: int) -> int:
    """Rows of the float32 partial sums the varlen backward writes: runs of the one packed row."""
    total, H = hidden.shape
    return _backward_runs(1, total, H, hidden.element_size(), is_aligned(hidden), sms)[0] if total else 0


def varlen_backward_launches(grads, hidden, weight, cu_seqlens, seq_lens, start, last_index, baseline_zero,
                             output_mask, outputs, scratch, sms: int) -> list[Launch]:
    """The varlen backward's launches on normalised inputs: _packed_gradient_kernel writes each token's mask and
    score gradient into ``scratch`` (uint8 [T], float32 [T]), then `backward_launches` of a [1, T_local, H] batch,
    PACKED, reads them."""
    total, H = hidden.shape
    N = seq_lens.shape[0]
    need_hidden, need_weight, need_bias = output_mask
    grad_hidden, partial_weight, partial_bias = outputs
    mask, g = scratch
    if total == 0 or not (need_hidden or need_weight or need_bias):
        return []
    aligned = is_aligned(hidden)
    block_t, block_h, num_warps, _ = backward_config(1, total, H, hidden.element_size(), aligned, sms)
    runs, rows_per_run = _backward_runs(1, total, H, hidden.element_size(), aligned, sms)
    h_tiles = triton.cdiv(H, block_h) if need_hidden or need_weight else 1
    grad_scores, grad_rewards, grad_token_rewards = grads
    return [Launch(_packed_gradient_kernel, (triton.cdiv(total, _PACKED_GRADIENT_BLOCK),),
                   (grad_scores, grad_rewards, grad_token_rewards, cu_seqlens, seq_lens, start, last_index, mask, g,
                    total, N),
                   dict(BASELINE_ZERO=baseline_zero, SEARCH_STEPS=N.bit_length(), BLOCK=_PACKED_GRADIENT_BLOCK), 4),
            Launch(_backward_kernel, (runs, h_tiles),
                   (*grads, hidden, weight, mask, start, last_index, grad_hidden, partial_weight, partial_bias,
                    total, H, runs, rows_per_run, 0, hidden.stride(0), g),
                   dict(BASELINE_ZERO=baseline_zero, NEED_HIDDEN=need_hidden, NEED_WEIGHT=need_weight,
                        NEED_BIAS=need_bias, BLOCK_T=block_t, BLOCK_H=block_h,
                        NUM_STAGES=_NUM_STAGES if aligned else _NUM_STAGES_UNALIGNED_BACKWARD, PACKED=True,
                        ROUND_BF16=_interpreted()),
                   num_warps, max_registers=_backward_max_registers(hidden.element_size(), num_warps))]


def redistribute_varlen_backward(grad_scores, grad_rewards, grad_token_rewards, hidden, weight, cu_seqlens, seq_lens,
                                 start, last_index, baseline_zero, output_mask):
    """grad_hidden, grad_weight, grad_bias of the packed op; an output not asked for is an empty tensor. The
    carried baseline's gradient is taken in _library.py."""
    total, H = hidden.shape
    N = seq_lens.shape[0]
    _check_layout(hidden, **_packed_layout(hidden, weight, cu_seqlens, seq_lens, start),
                  grad_scores=(grad_scores, torch.float32, (total,)), grad_rewards=(grad_rewards, torch.float32, (N,)),
                  grad_token_rewards=(grad_token_rewards, torch.float32, (total,)),
                  last_index=(last_index, torch.int64, (N,)))
    need = tuple(bool(flag) for flag in output_mask)
    device = hidden.device
    sms = sm_count(device)
    runs = varlen_backward_partial_rows(hidden, sms)
    outputs = (torch.empty((total, H) if need[0] else (0,), dtype=hidden.dtype, device=device),
               torch.empty((runs, H) if need[1] else (0,), dtype=torch.float32, device=device),
               torch.empty((runs,) if need[2] else (0,), dtype=torch.float32, device=device))
    scratch = (torch.empty((total,), dtype=torch.uint8, device=device),
               torch.empty((total,), dtype=torch.float32, device=device))
    with _on_device(hidden):
        for launch in varlen_backward_launches((grad_scores, grad_rewards, grad_token_rewards), hidden, weight,
                                               cu_seqlens, seq_lens, start, last_index, baseline_zero, need, outputs,
                                               scratch, sms):
            launch()
    grad_hidden, partial_weight, partial_bias = outputs
    # Partial sums in a fixed order: deterministic for a fixed launch configuration.
    grad_weight = partial_weight.sum(0) if need[1] else torch.empty((0,), dtype=torch.float32, device=device)
    grad_bias = partial_bias.sum(0, keepdim=True) if need[2] else torch.empty((0,), dtype=torch.float32, device=device)
    return grad_hidden, grad_weight, grad_bias
