"""Glue between the kernels and PyTorch: the compiled extension, fake (meta)
implementations for torch.compile, and autograd for every fused backend.

The op schema is declared once in C++ (csrc/op.cpp):

    red_kernels::redistribute(Tensor hidden, Tensor weight, Tensor? bias, Tensor mask,
                              Tensor start, bool baseline_zero)
        -> (Tensor scores, Tensor rewards, Tensor token_rewards, Tensor last_index)
    red_kernels::redistribute_backward(Tensor grad_scores, Tensor grad_rewards,
        Tensor grad_token_rewards, Tensor hidden, Tensor weight, Tensor mask, Tensor start,
        Tensor last_index, bool baseline_zero, bool[3] output_mask)
        -> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)

Inputs reach the kernels normalised by `red_kernels.op.redistribute`: hidden [B, T, H] with
unit innermost stride, weight float32 [H] contiguous, bias float32 [1] or None, mask uint8
[B, T] contiguous (nonzero = real token), start int64 [B] contiguous (clamped by the kernels).
The Triton backend is the same pair of ops under the names ``redistribute_triton`` and
``redistribute_triton_backward``, defined here in Python.
"""

from __future__ import annotations

import importlib.util

import torch

try:
    from red_kernels import _C  # noqa: F401  (loading it registers the C++ op)

    EXTENSION_ERROR: str | None = None
except ImportError as error:  # a source checkout that was never built
    _C = None
    EXTENSION_ERROR = str(error)

HAS_CPU_KERNEL = _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "red_kernels::redistribute", "CPU"
)
HAS_CUDA_KERNEL = _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "red_kernels::redistribute", "CUDA"
)


def _find_triton_version() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return None
    import triton

    return triton.__version__


TRITON_VERSION = _find_triton_version()


# ---------------------------------------------------------------------------------------
# Shapes of the outputs, shared by the fake implementations of both op pairs.


def _forward_fake(hidden, weight, bias, mask, start, baseline_zero):
    B, T, _ = hidden.shape
    scores = hidden.new_empty((B, T), dtype=torch.float32)
    rewards = hidden.new_empty((B,), dtype=torch.float32)
    token_rewards = hidden.new_empty((B, T), dtype=torch.float32)
    last_index = hidden.new_empty((B,), dtype=torch.int64)
    return scores, rewards, token_rewards, last_index


def _backward_fake(grad_scores, grad_rewards, grad_token_rewards, hidden, weight, mask, start,
                   last_index, baseline_zero, output_mask):
    grad_hidden = hidden.new_empty(hidden.shape) if output_mask[0] else hidden.new_empty((0,))
    grad_weight = weight.new_empty(weight.shape) if output_mask[1] else weight.new_empty((0,))
    grad_bias = weight.new_empty((1,)) if output_mask[2] else weight.new_empty((0,))
    return grad_hidden, grad_weight, grad_bias


def _make_setup_context(packed: bool):
    """Saves what the backward needs. The padded op's inputs are (hidden, weight, bias, mask, start,
    baseline_zero), the packed op's (hidden, weight, bias, cu_seqlens, seq_lens, start, prev_scores,
    baseline_zero): the tensors between bias and start say where the rows are (the layout)."""

    def setup_context(ctx, inputs, output):
        hidden, weight, bias, *layout, start = inputs[:-1] if not packed else inputs[:-2]
        prev_scores = inputs[-2] if packed else None
        ctx.save_for_backward(hidden, weight, *layout, start, output[3], prev_scores)
        ctx.baseline_zero = inputs[-1]
        ctx.has_bias = bias is not None

    return setup_context


def _make_backward(backward_name: str, packed: bool = False):
    """Autograd of either op through its backward kernel ``backward_name``; for the packed op, also the
    gradient of prev_scores (carried_baseline_gradient, below)."""

    def backward(ctx, grad_scores, grad_rewards, grad_token_rewards, _grad_last_index):
        hidden, weight, *layout, start, last_index, prev_scores = ctx.saved_tensors
        output_mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                       ctx.needs_input_grad[2] and ctx.has_bias]
        # [B, T] and [B] (padded, from the mask), or [T] and [N] (packed, from hidden and seq_lens)
        positions, sequences = ((hidden.shape[0],), (layout[1].shape[0],)) if packed else (layout[0].shape,
                                                                                          layout[0].shape[:1])
        # An output that took no part in the loss arrives as None: it contributes zero.
        if grad_scores is None:
            grad_scores = hidden.new_zeros(positions, dtype=torch.float32)
        if grad_rewards is None:
            grad_rewards = hidden.new_zeros(sequences, dtype=torch.float32)
        if grad_token_rewards is None:
            grad_token_rewards = hidden.new_zeros(positions, dtype=torch.float32)
        grad_token_rewards = grad_token_rewards.float().contiguous()
        grad_hidden, grad_weight, grad_bias = getattr(torch.ops.red_kernels, backward_name)(
            grad_scores.float().contiguous(), grad_rewards.float().contiguous(), grad_token_rewards, hidden,
            weight, *layout, start, last_index, ctx.baseline_zero, output_mask,
        )
        grads = [grad_hidden if output_mask[0] else None, grad_weight if output_mask[1] else None,
                 grad_bias if output_mask[2] else None] + [None] * (len(layout) + 1)  # the layout, start
        if packed:
            cu_seqlens, seq_lens = layout
            grad_prev = None
            if ctx.needs_input_grad[6] and prev_scores is not None:
                grad_prev = carried_baseline_gradient(grad_token_rewards, cu_seqlens, seq_lens, start, prev_scores)
            grads.append(grad_prev)
        return (*grads, None)  # baseline_zero

    return backward


_setup_context = _make_setup_context(packed=False)


if _C is not None:
    torch.library.register_fake("red_kernels::redistribute")(_forward_fake)
    torch.library.register_fake("red_kernels::redistribute_backward")(_backward_fake)
    torch.library.register_autograd(
        "red_kernels::redistribute",
        _make_backward("redistribute_backward"),
        setup_context=_setup_context,
    )


# ---------------------------------------------------------------------------------------
# The Triton backend as a custom op of its own, so torch.compile and autograd see it the
# same way they see the C++ op.

if TRITON_VERSION is not None:

    @torch.library.custom_op("red_kernels::redistribute_triton", mutates_args=())
    def redistribute_triton(
        hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor,
        start: torch.Tensor, baseline_zero: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        from red_kernels.triton_kernels import redistribute_forward

        return redistribute_forward(hidden, weight, bias, mask, start, baseline_zero)

    @torch.library.custom_op("red_kernels::redistribute_triton_backward", mutates_args=())
    def redistribute_triton_backward(
        grad_scores: torch.Tensor, grad_rewards: torch.Tensor, grad_token_rewards: torch.Tensor,
        hidden: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, start: torch.Tensor,
        last_index: torch.Tensor, baseline_zero: bool, output_mask: list[bool],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from red_kernels.triton_kernels import redistribute_backward

        return redistribute_backward(grad_scores, grad_rewards, grad_token_rewards, hidden, weight,
                                     mask, start, last_index, baseline_zero, output_mask)

    redistribute_triton.register_fake(_forward_fake)
    redistribute_triton_backward.register_fake(_backward_fake)
    redistribute_triton.register_autograd(
        _make_backward("redistribute_triton_backward"), setup_context=_setup_context
    )


# ---------------------------------------------------------------------------------------
# Packed sequences (docs/spec.md section 5): the same layers for redistribute_varlen. Inputs reach the kernels
# normalised by `red_kernels.op.redistribute_varlen`: hidden [T, H] with unit innermost stride, weight and
# bias as above, cu_seqlens int64 [N+1] and seq_lens int64 [N] contiguous and validated (0 first,
# non-decreasing, within hidden; 0 <= seq_lens <= slot), start int64 [N] (clamped by the kernels to
# [0, seq_lens]), prev_scores float32 [N] or None (NaN: no carried baseline).
#
#   red_kernels::redistribute_varlen(Tensor hidden, Tensor weight, Tensor? bias, Tensor cu_seqlens,
#       Tensor seq_lens, Tensor start, Tensor? prev_scores, bool baseline_zero)
#       -> (Tensor scores [T], Tensor rewards [N], Tensor token_rewards [T], Tensor last_index [N])
#   red_kernels::redistribute_varlen_backward(Tensor grad_scores, Tensor grad_rewards,
#       Tensor grad_token_rewards, Tensor hidden, Tensor weight, Tensor cu_seqlens, Tensor seq_lens,
#       Tensor start, Tensor last_index, bool baseline_zero, bool[3] output_mask)
#       -> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)
#
# The backward kernels need no prev_scores: a carried baseline is an input, not a score of this rank, so
# its gradient (-grad_token_rewards at the sequence's first token, when that token is in the response and
# the baseline is not NaN) is taken here, in the autograd function.

HAS_VARLEN_CPU_KERNEL = _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "red_kernels::redistribute_varlen", "CPU"
)
HAS_VARLEN_CUDA_KERNEL = _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "red_kernels::redistribute_varlen", "CUDA"
)


def _varlen_forward_fake(hidden, weight, bias, cu_seqlens, seq_lens, start, prev_scores, baseline_zero):
    T = hidden.shape[0]
    N = seq_lens.shape[0]
    scores = hidden.new_empty((T,), dtype=torch.float32)
    rewards = hidden.new_empty((N,), dtype=torch.float32)
    token_rewards = hidden.new_empty((T,), dtype=torch.float32)
    last_index = hidden.new_empty((N,), dtype=torch.int64)
    return scores, rewards, token_rewards, last_index


def _varlen_backward_fake(grad_scores, grad_rewards, grad_token_rewards, hidden, weight, cu_seqlens, seq_lens,
                          start, last_index, baseline_zero, output_mask):
    return _backward_fake(grad_scores, grad_rewards, grad_token_rewards, hidden, weight, None, start, last_index,
                          baseline_zero, output_mask)


_varlen_setup_context = _make_setup_context(packed=True)


def carried_baseline_gradient(grad_token_rewards, cu_seqlens, seq_lens, start, prev_scores):
    """d(loss)/d(prev_scores): token_rewards[first] = scores[first] - prev_scores[i] where that token is a
    response token and the carried baseline is not NaN; 0 elsewhere."""
    N = seq_lens.shape[0]
    first = cu_seqlens[:N].clamp(max=max(grad_token_rewards.shape[0] - 1, 0))
    used = (seq_lens > 0) & (start <= 0) & ~torch.isnan(prev_scores)
    grad = -grad_token_rewards[first] if grad_token_rewards.numel() else prev_scores.new_zeros(N)
    return torch.where(used, grad, grad.new_zeros(()))


# The offsets' values, checked inside a graph: torch.compile and CUDA-graph capture cannot read them on the host
# while tracing or capturing (red_kernels._validate says where each call checks them). Its outputs are new int64
# tensors the kernels then read, so the check cannot be dropped from a graph as dead code.


@torch.library.custom_op("red_kernels::varlen_offsets", mutates_args=())
def varlen_offsets(cu_seqlens: torch.Tensor, seq_lens: torch.Tensor | None, total: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked int64 copies of ``cu_seqlens`` ``[N+1]`` and of ``seq_lens`` ``[N]`` (None: each slot's length)
    for ``total`` packed tokens: ValueError on the CPU, a device-side assertion elsewhere."""
    from red_kernels._validate import offsets_in_graph

    return offsets_in_graph(cu_seqlens, seq_lens, total)


@varlen_offsets.register_fake
def _varlen_offsets_fake(cu_seqlens, seq_lens, total):
    N = cu_seqlens.shape[0] - 1
    return cu_seqlens.new_empty((N + 1,), dtype=torch.int64), cu_seqlens.new_empty((N,), dtype=torch.int64)


if _C is not None:
    torch.library.register_fake("red_kernels::redistribute_varlen")(_varlen_forward_fake)
    torch.library.register_fake("red_kernels::redistribute_varlen_backward")(_varlen_backward_fake)
    torch.library.register_autograd(
        "red_kernels::redistribute_varlen",
        _make_backward("redistribute_varlen_backward", packed=True),
        setup_context=_varlen_setup_context,
    )

if TRITON_VERSION is not None:

    @torch.library.custom_op("red_kernels::redistribute_varlen_triton", mutates_args=())
    def redistribute_varlen_triton(
        hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cu_seqlens: torch.Tensor,
        seq_lens: torch.Tensor, start: torch.Tensor, prev_scores: torch.Tensor | None, baseline_zero: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        from red_kernels.triton_kernels import redistribute_varlen_forward

        return redistribute_varlen_forward(hidden, weight, bias, cu_seqlens, seq_lens, start, prev_scores,
                                           baseline_zero)

    @torch.library.custom_op("red_kernels::redistribute_varlen_triton_backward", mutates_args=())
    def redistribute_varlen_triton_backward(
        grad_scores: torch.Tensor, grad_rewards: torch.Tensor, grad_token_rewards: torch.Tensor,
        hidden: torch.Tensor, weight: torch.Tensor, cu_seqlens: torch.Tensor, seq_lens: torch.Tensor,
        start: torch.Tensor, last_index: torch.Tensor, baseline_zero: bool, output_mask: list[bool],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from red_kernels.triton_kernels import redistribute_varlen_backward

        return redistribute_varlen_backward(grad_scores, grad_rewards, grad_token_rewards, hidden, weight,
                                            cu_seqlens, seq_lens, start, last_index, baseline_zero, output_mask)

    redistribute_varlen_triton.register_fake(_varlen_forward_fake)
    redistribute_varlen_triton_backward.register_fake(_varlen_backward_fake)
    redistribute_varlen_triton.register_autograd(
        _make_backward("redistribute_varlen_triton_backward", packed=True), setup_context=_varlen_setup_context
    )
