"""The public fused op: input checks, normalisation, backend choice.

Every rule of SPEC.md section 2 is checked here, before any kernel runs, so a bad call
raises without producing (or half-writing) anything.
"""

from __future__ import annotations

import numbers
import os
import reprlib
from typing import NamedTuple

import torch

from red_kernels import _library
from red_kernels.reference import redistribute_reference

BACKENDS = ("eager", "cpu", "triton", "cuda")
BASELINES = ("prompt", "zero")
HIDDEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

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


# Previews of non-tensor arguments in error messages: a few items, a few levels, one short line.
_PREVIEW = reprlib.Repr()
_PREVIEW.maxlevel, _PREVIEW.maxlist, _PREVIEW.maxtuple, _PREVIEW.maxdict = 3, 4, 4, 4
_PREVIEW.maxstring, _PREVIEW.maxother = 40, 40
PREVIEW_CHARS = 80


def _describe(x) -> str:
    """The type and a short preview of ``x`` for an error message (never a whole object's repr)."""
    if isinstance(x, torch.Tensor):
        layout = "" if x.layout == torch.strided else f", layout {x.layout}"
        if x.is_nested:  # its shape is ragged
            return f"a nested tensor of {x.dim()} dimensions, dtype {x.dtype}{layout}, on {x.device}"
        return f"a tensor of shape {list(x.shape)}, dtype {x.dtype}{layout}, on {x.device}"
    try:
        preview = _PREVIEW.repr(x)
    except Exception:  # a broken __repr__ must not hide the error being reported
        preview = "<unprintable>"
    if len(preview) > PREVIEW_CHARS:
        preview = preview[:PREVIEW_CHARS - 3] + "..."
    return f"{type(x).__name__} {preview}"


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_strided(name: str, x) -> None:
    """TypeError unless ``x`` (when a tensor) is dense and strided: the kernels index raw strides."""
    if isinstance(x, torch.Tensor) and (x.layout != torch.strided or x.is_nested):
        if x.is_nested:
            kind, fix = "a nested tensor", ".to_padded_tensor(0.0)"
        else:
            kind, fix = f"layout {x.layout}", ".to_dense()"
        raise TypeError(f"{name}: expected a dense (strided) tensor, got {kind}: {_describe(x)}; call {fix} first")


def _check_inputs(hidden, weight, bias, attention_mask, response_start, baseline, backend) -> None:
    for name, value in (("hidden", hidden), ("weight", weight), ("bias", bias), ("attention_mask", attention_mask),
                        ("response_start", response_start)):
        check_strided(name, value)
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden: expected a tensor [B, T, H], got {_describe(hidden)}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden: expected 3 dimensions [B, T, H], got {_describe(hidden)}")
    if hidden.dtype not in HIDDEN_DTYPES:
        raise TypeError(f"hidden: expected dtype float32, bfloat16 or float16, got {_describe(hidden)}")
    B, T, H = hidden.shape
    if T < 1 or H < 1:
        raise ValueError(f"hidden: expected T >= 1 and H >= 1, got {_describe(hidden)}")
    device = hidden.device
    _check_head(weight, bias, H)

    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask: expected a bool or integer tensor [{B}, {T}], got {_describe(attention_mask)}")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError(f"attention_mask: expected a bool or integer dtype, got {_describe(attention_mask)}")
    if tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask: expected shape [{B}, {T}], got {_describe(attention_mask)}")

    if isinstance(response_start, torch.Tensor):
        if response_start.dtype == torch.bool or response_start.is_floating_point() or response_start.is_complex():
            raise TypeError(f"response_start: expected an integer tensor [{B}], got {_describe(response_start)}")
        if tuple(response_start.shape) != (B,):
            raise ValueError(f"response_start: expected shape [{B}], got {_describe(response_start)}")
    elif _is_int(response_start):
        if not 0 <= response_start <= T:
            raise ValueError(f"response_start: expected an int in [0, {T}], got {response_start}")
    else:
        raise TypeError(f"response_start: expected an int or an integer tensor [{B}], got {_describe(response_start)}")

    for name, value in (("weight", weight), ("bias", bias), ("attention_mask", attention_mask),
                        ("response_start", response_start)):
        if isinstance(value, torch.Tensor) and value.device != device:
            raise ValueError(f"{name} is on {value.device}, hidden on {device}: all tensors must be on one device "
                             f"({name}: {_describe(value)})")

    _check_options(baseline, backend)


def _check_head(weight, bias, H: int) -> None:
    """The score head: ``weight`` ``[H]`` or ``[1, H]``, ``bias`` None, a float or one element (devices: the caller)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a tensor [H] or [1, H] with H={H}, got {_describe(weight)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight: expected a floating-point dtype, got {_describe(weight)}")
    if tuple(weight.shape) not in ((H,), (1, H)):
        raise ValueError(f"weight: expected shape [{H}] or [1, {H}], got {_describe(weight)}")

    if isinstance(bias, torch.Tensor):
        if not bias.is_floating_point():
            raise TypeError(f"bias: expected a floating-point tensor, got {_describe(bias)}")
        if bias.numel() != 1:
            raise ValueError(f"bias: expected one element, got {_describe(bias)}")
    elif bias is not None and not (isinstance(bias, numbers.Real) and not isinstance(bias, bool)):
        raise TypeError(f"bias: expected None, a Python float or a one-element tensor, got {_describe(bias)}")


def _check_options(baseline, backend) -> None:
    if baseline not in BASELINES:
        raise ValueError(f"baseline: expected one of {BASELINES}, got {_describe(baseline)}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {BACKENDS}, got {_describe(backend)}")


def _normalise_head(weight, bias, H: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernels' weight (float32 [H], contiguous) and bias (float32 [1] or None)."""
    weight32 = weight.reshape(H).to(torch.float32).contiguous()
    if isinstance(bias, torch.Tensor):
        return weight32, bias.reshape(1).to(torch.float32)
    if bias is not None:
        return weight32, torch.full((1,), float(bias), dtype=torch.float32, device=device)
    return weight32, None


def _normalise_start(response_start, n: int, past_end: int, device) -> torch.Tensor:
    """The kernels' response starts: int64 [n], contiguous (the kernels clamp them)."""
    if not isinstance(response_start, torch.Tensor):
        return torch.full((n,), response_start, dtype=torch.int64, device=device)
    start = response_start.to(torch.int64).contiguous()
    if response_start.dtype == torch.uint64:
        # The cast keeps the bits, so a value >= 2^63 reads negative: it lies past the end, clamp it there
        # (uint64 has no comparison kernels, and the kernels clamp the rest).
        start = torch.where(start < 0, past_end, start)
    return start


def resolve_backend(backend: str, device: torch.device, *, varlen: bool = False) -> str:
    """The backend that runs for ``backend`` on ``device`` (SPEC: auto picks the fused kernel); ``varlen``: for
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
    ``s_t - s_{t-1}`` and the last real index (SPEC.md section 2). Differentiable in
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
# Packed input (SPEC.md section 5)

INDEX_DTYPES = (torch.int32, torch.int64)


def flatten_packed(hidden: torch.Tensor) -> torch.Tensor:
    """``[T, H]``, ``[1, T, H]`` or ``[T, 1, H]`` as a ``[T, H]`` view (no copy); ValueError otherwise."""
    if hidden.dim() == 2:
        return hidden
    if hidden.dim() == 3 and hidden.shape[0] == 1:
        return hidden[0]
    if hidden.dim() == 3 and hidden.shape[1] == 1:
        return hidden[:, 0]
    raise ValueError(f"hidden: expected packed tokens [T, H], [1, T, H] or [T, 1, H], got {_describe(hidden)}")


def _check_index_vector(name: str, x, length: int | None, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected an int32 or int64 tensor {what}, got {_describe(x)}")
    if x.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name}: expected dtype int32 or int64 {what}, got {_describe(x)}")
    if x.dim() != 1 or (length is not None and x.shape[0] != length):
        raise ValueError(f"{name}: expected shape {what}, got {_describe(x)}")


def _check_varlen_inputs(hidden, weight, bias, cu_seqlens, response_start, seq_lens, prev_scores, baseline,
                         backend) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rule of section 5; returns the flattened hidden and the offsets and lengths as int64 tensors.

    Offsets and lengths are read on the host (one small copy): a bad offset must fail before a kernel
    indexes with it, and it cannot be clamped into meaning.
    """
    for name, value in (("hidden", hidden), ("weight", weight), ("bias", bias), ("cu_seqlens", cu_seqlens),
                        ("response_start", response_start), ("seq_lens", seq_lens), ("prev_scores", prev_scores)):
        check_strided(name, value)
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden: expected a tensor [T, H], [1, T, H] or [T, 1, H], got {_describe(hidden)}")
    if hidden.dtype not in HIDDEN_DTYPES:
        raise TypeError(f"hidden: expected dtype float32, bfloat16 or float16, got {_describe(hidden)}")
    flat = flatten_packed(hidden)
    total, H = flat.shape
    if H < 1:
        raise ValueError(f"hidden: expected H >= 1, got {_describe(hidden)}")
    device = hidden.device
    _check_head(weight, bias, H)
    _check_options(baseline, backend)

    _check_index_vector("cu_seqlens", cu_seqlens, None, "[N + 1]")
    if cu_seqlens.shape[0] < 1:
        raise ValueError(f"cu_seqlens: expected [N + 1] offsets (at least one), got {_describe(cu_seqlens)}")
    N = cu_seqlens.shape[0] - 1
    if seq_lens is not None:
        _check_index_vector("seq_lens", seq_lens, N, f"[{N}] (one per sequence of cu_seqlens)")
    if isinstance(response_start, torch.Tensor):
        if response_start.dtype == torch.bool or response_start.is_floating_point() or response_start.is_complex():
            raise TypeError(f"response_start: expected an integer tensor [{N}], got {_describe(response_start)}")
        if tuple(response_start.shape) != (N,):
            raise ValueError(f"response_start: expected shape [{N}] (one per sequence), got "
                             f"{_describe(response_start)}")
    elif _is_int(response_start):
        if response_start < 0:
            raise ValueError(f"response_start: expected an int >= 0 (relative to each sequence's start), "
                             f"got {response_start}")
    else:
        raise TypeError(f"response_start: expected an int or an integer tensor [{N}], got "
                        f"{_describe(response_start)}")
    if prev_scores is not None:
        if not isinstance(prev_scores, torch.Tensor) or not prev_scores.is_floating_point():
            raise TypeError(f"prev_scores: expected None or a floating-point tensor [{N}], got "
                            f"{_describe(prev_scores)}")
        if tuple(prev_scores.shape) != (N,):
            raise ValueError(f"prev_scores: expected shape [{N}] (one per sequence), got {_describe(prev_scores)}")
    for name, value in (("weight", weight), ("bias", bias), ("cu_seqlens", cu_seqlens), ("seq_lens", seq_lens),
                        ("response_start", response_start), ("prev_scores", prev_scores)):
        if isinstance(value, torch.Tensor) and value.device != device:
            raise ValueError(f"{name} is on {value.device}, hidden on {device}: all tensors must be on one device "
                             f"({name}: {_describe(value)})")

    cu = cu_seqlens.to(torch.int64)
    # One device-to-host copy for the offsets and the lengths together.
    host_all = (cu if seq_lens is None else torch.cat([cu, seq_lens.to(torch.int64)])).cpu()
    host = host_all[:N + 1]
    steps = torch.diff(host)
    # One test for the usual case; the details only when something is wrong.
    if int(host[0]) != 0 or int(host[N]) > total or (N > 0 and int(steps.min()) < 0):
        if host[0] != 0:
            raise ValueError(f"cu_seqlens: expected the first offset to be 0, got {int(host[0])}")
        if (steps < 0).any():
            i = int((steps < 0).nonzero()[0])
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got cu_seqlens[{i}] = {int(host[i])} > "
                             f"cu_seqlens[{i + 1}] = {int(host[i + 1])}")
        raise ValueError(f"cu_seqlens: the last offset {int(host[N])} passes the end of hidden's {total} tokens")
    if seq_lens is None:
        lens = torch.diff(cu)
    else:
        lens = seq_lens.to(torch.int64)
        host_lens = host_all[N + 1:]
        bad = (host_lens < 0) | (host_lens > steps)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"seq_lens: expected 0 <= seq_lens[i] <= the slot's length, got seq_lens[{i}] = "
                             f"{int(host_lens[i])} for a slot of {int(steps[i])} tokens")
    return flat, cu.contiguous(), lens.contiguous()


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
    """`redistribute` on packed sequences (SPEC.md section 5): flash-attn / verl / Megatron layouts.

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
    Offsets and lengths are checked on the host (one small device-to-host copy).
    """
    flat, cu, lens = _check_varlen_inputs(hidden, weight, bias, cu_seqlens, response_start, seq_lens, prev_scores,
                                          baseline, backend)
    name = resolve_backend(backend, hidden.device, varlen=True)
    total, H = flat.shape
    N = lens.shape[0]
    device = hidden.device
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
