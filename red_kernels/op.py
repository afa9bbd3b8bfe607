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


def available_backends(device: str | torch.device = "cpu") -> tuple[str, ...]:
    """Backend names usable for tensors on ``device``, in the order of `BACKENDS`."""
    device = torch.device(device)
    usable = ["eager"]
    if device.type == "cpu":
        if _library.HAS_CPU_KERNEL:
            usable.append("cpu")
        if TRITON_INTERPRET and _library.TRITON_VERSION is not None:
            usable.append("triton")
    elif device.type == "cuda":
        if _library.TRITON_VERSION is not None:
            usable.append("triton")
        if _library.HAS_CUDA_KERNEL:
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

    if baseline not in BASELINES:
        raise ValueError(f"baseline: expected one of {BASELINES}, got {_describe(baseline)}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {BACKENDS}, got {_describe(backend)}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs for ``backend`` on ``device`` (SPEC: auto picks the fused kernel)."""
    usable = available_backends(device)
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
    weight32 = weight.reshape(H).to(torch.float32).contiguous()
    if isinstance(bias, torch.Tensor):
        bias32 = bias.reshape(1).to(torch.float32)
    elif bias is not None:
        bias32 = torch.full((1,), float(bias), dtype=torch.float32, device=device)
    else:
        bias32 = None
    if attention_mask.dtype in (torch.bool, torch.uint8):
        mask = attention_mask.contiguous().view(torch.uint8)
    else:
        # != keeps a transposed mask's strides: the kernels index it as a contiguous [B, T].
        mask = (attention_mask != 0).contiguous().view(torch.uint8)
    if isinstance(response_start, torch.Tensor):
        start = response_start.to(torch.int64).contiguous()
        if response_start.dtype == torch.uint64:
            # The cast keeps the bits, so a value >= 2^63 reads negative: it lies past T, clamp it there
            # (uint64 has no comparison kernels, and the kernels clamp the rest to [0, T]).
            start = torch.where(start < 0, T, start)
    else:
        start = torch.full((B,), response_start, dtype=torch.int64, device=device)
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
