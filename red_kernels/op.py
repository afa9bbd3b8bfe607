"""The public fused op: input checks, normalisation, backend choice.

Every rule of docs/spec.md section 2 is checked before any kernel runs (the checks live in
`red_kernels._validate`), so a bad call raises without producing (or half-writing) anything.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from red_kernels import _library
from red_kernels._validate import (BACKENDS, _check_inputs, _check_varlen_inputs, _normalise_head, _normalise_start,
                                   checked_offsets, flatten_packed)
from red_kernels.reference import redistribute_reference

__all__ = ["BACKENDS", "RedistributeOutput", "available_backends", "flatten_packed", "redistribute",
           "redistribute_varlen", "resolve_backend"]

# The spec reads the switch once, when the package is imported.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


class RedistributeOutput(NamedTuple):
    """What `redistribute` returns; every float output is float32."""

    scores: torch.Tensor  # [B, T]: score head at every real position, 0 at padding
    rewards: torch.Tensor  # [B]: score at the last real token (0 for an empty row)
    token_rewards: torch.Tensor  # [B, T]: s_t - s_{t-1} on response tokens, 0 elsewhere
    last_index: torch.Tensor  # [B] int64: last real position, -1 for an empty row


def available_backends(device: str | torch.device = "cpu", *, varlen: bool = False) -> tuple[str, ...]:
    """Backend names usable for tensors on ``device``, in the order of `BACKENDS`: for `redistribute`, or with
    ``varlen=True`` for `redistribute_varlen` (a C++ backend counts where that op's kernel is registered)."""
    device = torch.device(device)
    has_cpu = _library.HAS_VARLEN_CPU_KERNEL if varlen else _library.HAS_CPU_KERNEL
    has_cuda = _library.HAS_VARLEN_CUDA_KERNEL if varlen else _library.HAS_CUDA_KERNEL
    usable = ["eager"]
    if device.type == "cpu":
        if has_cpu:
            usable.append("cpu")
        if TRITON_INTERPRET and _library.TRITON_VERSION is not None:
            usable.append("triton")
    elif device.type == "cuda":
        if _library.TRITON_VERSION is not None:
            usable.append("triton")
        if has_cuda:
            usable.append("cuda")
    return tuple(usable)


def resolve_backend(backend: str, device: torch.device, *, varlen: bool = False) -> str:
    """The backend that runs for ``backend`` on ``device`` (docs/spec.md: auto picks the fused kernel); ``varlen``: for
    `redistribute_varlen`."""
    usable = available_backends(device, varlen=varlen)
    if backend == "auto":
        preferred = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}.get(device.type, ())
        return next((name for name in preferred if name in usable), "eager")
    if backend not in usable:
        raise ValueError(f"backend: {backend!r} is not usable for tensors on {device}; usable: {usable}")
    return backend


def redistribute(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | float | None = None,
    *,
    attention_mask: torch.Tensor,
    response_start: int | torch.Tensor,
    baseline: str = "prompt",
    backend: str = "auto",
) -> RedistributeOutput:
    """Score every prefix and redistribute the sequence reward over the response tokens.

    Reads the reward model's final hidden states ``[B, T, H]`` once and returns the score
    head at every position, the last-token reward, the token rewards
    ``s_t - s_{t-1}`` and the last real index (docs/spec.md section 2). Differentiable in
    ``hidden``, ``weight`` and ``bias`` on every backend.
    """
    _check_inputs(hidden, weight, bias, attention_mask, response_start, baseline, backend)
    name = resolve_backend(backend, hidden.device)
    B, T, H = hidden.shape
    device = hidden.device

    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    weight32, bias32 = _normalise_head(weight, bias, H, device)
    if attention_mask.dtype in (torch.bool, torch.uint8):
        mask = attention_mask.contiguous().view(torch.uint8)
    else:
        # != keeps a transposed mask's strides: the kernels index it as a contiguous [B, T].
        mask = (attention_mask != 0).contiguous().view(torch.uint8)
    start = _normalise_start(response_start, B, T, device)
    baseline_zero = baseline == "zero"

    return RedistributeOutput(*_launch("eager" if B == 0 else name, hidden, weight32, bias32, mask, start,
                                       baseline_zero))


def _launch(name, hidden, weight, bias, mask, start, baseline_zero):
    """Run backend ``name`` on normalised inputs (the layout _library.py documents)."""
    if name == "eager":
        return redistribute_reference(hidden, weight, bias, mask, start, baseline_zero)
    if name == "triton":
        return torch.ops.red_kernels.redistribute_triton(hidden, weight, bias, mask, start, baseline_zero)
    # "cpu" and "cuda" are the one C++ op; the dispatcher picks the kernel by device.
    return torch.ops.red_kernels.redistribute(hidden, weight, bias, mask, start, baseline_zero)


# ---------------------------------------------------------------------------------------------
# Packed input (docs/spec.md section 5)


def redistribute_varlen(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | float | None = None,
    *,
    cu_seqlens: torch.Tensor,
    response_start: int | torch.Tensor,
    seq_lens: torch.Tensor | None = None,
    prev_scores: torch.Tensor | None = None,
    baseline: str = "prompt",
    backend: str = "auto",
) -> RedistributeOutput:
    """`redistribute` on packed sequences (docs/spec.md section 5): flash-attn / verl / Megatron layouts.

    ``hidden`` is ``[T, H]``, ``[1, T, H]`` or ``[T, 1, H]`` (flattened to ``[T, H]`` without a copy).
    Sequence ``i`` occupies slot ``[cu_seqlens[i], cu_seqlens[i+1])``, int32 or int64 ``[N+1]`` starting at 0;
    tokens past ``cu_seqlens[-1]`` are padding. ``seq_lens`` (``[N]``, default the whole slot) counts the real
    tokens at the start of each slot (Megatron's in-slot padding). ``response_start`` (an int, or ``[N]``) is
    relative to each sequence's start, clamped to ``[0, seq_len]``.

    ``prev_scores`` (``[N]``, float) is for sequences split across ranks: ``prev_scores[i]`` is the baseline
    of sequence ``i``'s first token here, i.e. the score of the token just before it on the previous rank,
    or NaN when there is none (the sequence starts here, or, under ``baseline="zero"``, that token is a
    prompt token). `red_kernels.distributed` fills it. It is differentiable, so gradients flow back across ranks.

    Returns ``scores`` and ``token_rewards`` ``[T]`` (0 at padding), ``rewards`` and ``last_index`` ``[N]``
    (``last_index`` is the packed position of the sequence's last real token, -1 for an empty sequence).

    Where the offsets' values are checked (types and shapes are checked first, always):

    * an eager call (not under torch.compile, not captured into a CUDA graph) checks them on the host before
      any kernel runs and raises ValueError: free for CPU tensors, one small device-to-host copy for device
      tensors;
    * under torch.compile (fullgraph, every backend) or CUDA-graph capture, the op ``red_kernels::varlen_offsets``
      checks them inside the graph, with no sync: offsets on the CPU get the same host check and ValueError when
      the graph runs; offsets on a device get a device-side assertion (reported at the next synchronisation; on
      CUDA it ends the process's CUDA context), and the kernels behind it see only empty sequences, so a bad
      offset never produces output silently nor indexes out of bounds.
    """
    flat = _check_varlen_inputs(hidden, weight, bias, cu_seqlens, response_start, seq_lens, prev_scores, baseline,
                                backend)
    cu, lens = checked_offsets(cu_seqlens, seq_lens, flat.shape[0])
    return _redistribute_varlen(flat, weight, bias, cu, lens, response_start, prev_scores, baseline, backend)


def _redistribute_varlen(flat, weight, bias, cu, lens, response_start, prev_scores, baseline, backend
                         ) -> RedistributeOutput:
    """`redistribute_varlen` on checked inputs: ``flat`` ``[T, H]``, ``cu`` and ``lens`` int64, contiguous and
    valid (`red_kernels.distributed` calls it with offsets it checked itself)."""
    name = resolve_backend(backend, flat.device, varlen=True)
    total, H = flat.shape
    N = lens.shape[0]
    device = flat.device
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    weight32, bias32 = _normalise_head(weight, bias, H, device)
    start = _normalise_start(response_start, N, torch.iinfo(torch.int64).max, device)
    prev32 = None if prev_scores is None else prev_scores.to(torch.float32).contiguous()
    baseline_zero = baseline == "zero"
    if N == 0 or total == 0:
        name = "eager"
    return RedistributeOutput(*_launch_varlen(name, flat, weight32, bias32, cu, lens, start, prev32,
                                              baseline_zero))


def _launch_varlen(name, hidden, weight, bias, cu_seqlens, seq_lens, start, prev_scores, baseline_zero):
    if name == "eager":
        from red_kernels.reference import redistribute_varlen_reference

        return redistribute_varlen_reference(hidden, weight, bias, cu_seqlens, seq_lens, start, prev_scores,
                                             baseline_zero)
    op = torch.ops.red_kernels.redistribute_varlen_triton if name == "triton" else \
        torch.ops.red_kernels.redistribute_varlen
    return op(hidden, weight, bias, cu_seqlens, seq_lens, start, prev_scores, baseline_zero)
