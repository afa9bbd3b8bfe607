"""Input checks, error messages and the normalisation of checked inputs, for every public entry point.

Every rule of docs/spec.md section 2 (and section 5 for packed input) is checked here, before any kernel runs, so
a bad call raises without producing (or half-writing) anything. `red_kernels.op`, `red_kernels.hf` and
`red_kernels.distributed` import their checks from this module.

The values of packed offsets (``cu_seqlens``, ``seq_lens``) are the one rule the shapes cannot show. Where they
are checked (`checked_offsets`):

* in an eager call that is not being captured into a CUDA graph, on the host, before any kernel: one read of
  the values (free for CPU tensors, one device-to-host copy for device tensors), and a ValueError naming the
  first broken rule;
* under torch.compile or CUDA-graph capture, by the op ``red_kernels::varlen_offsets`` inside the graph, at run
  time: offsets on the CPU get the same host check and the same ValueError; offsets on a device are checked on
  the device (`check_offsets_on_device`, no sync): a bad offset fails at the next synchronisation with a
  device-side assertion naming the rules (on CUDA such an assertion ends the process's CUDA context), and the
  kernels queued behind it are handed empty sequences, so they never index memory with it.
"""

from __future__ import annotations

import numbers
import operator
import reprlib

import torch

BACKENDS = ("eager", "cpu", "triton", "cuda")
BASELINES = ("prompt", "zero")
HIDDEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)

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
    """Every rule of section 2 for `red_kernels.redistribute`."""
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

    _check_same_device(device, (("weight", weight), ("bias", bias), ("attention_mask", attention_mask),
                                ("response_start", response_start)))
    _check_options(baseline, backend)


def _check_same_device(device, named) -> None:
    for name, value in named:
        if isinstance(value, torch.Tensor) and value.device != device:
            raise ValueError(f"{name} is on {value.device}, hidden on {device}: all tensors must be on one device "
                             f"({name}: {_describe(value)})")


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


# ---------------------------------------------------------------------------------------------
# Packed input (docs/spec.md section 5)


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
                         backend) -> torch.Tensor:
    """Every rule of section 5 that types, shapes and devices show; returns hidden flattened to ``[T, H]``.
    The offsets' values are `checked_offsets`' part."""
    for name, value in (("hidden", hidden), ("weight", weight), ("bias", bias), ("cu_seqlens", cu_seqlens),
                        ("response_start", response_start), ("seq_lens", seq_lens), ("prev_scores", prev_scores)):
        check_strided(name, value)
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden: expected a tensor [T, H], [1, T, H] or [T, 1, H], got {_describe(hidden)}")
    if hidden.dtype not in HIDDEN_DTYPES:
        raise TypeError(f"hidden: expected dtype float32, bfloat16 or float16, got {_describe(hidden)}")
    flat = flatten_packed(hidden)
    H = flat.shape[1]
    if H < 1:
        raise ValueError(f"hidden: expected H >= 1, got {_describe(hidden)}")
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
    _check_same_device(hidden.device, (("weight", weight), ("bias", bias), ("cu_seqlens", cu_seqlens),
                                       ("seq_lens", seq_lens), ("response_start", response_start),
                                       ("prev_scores", prev_scores)))
    return flat


def offsets_on_host(cu_seqlens: torch.Tensor, seq_lens: torch.Tensor | None, *more: torch.Tensor) -> list[int]:
    """The values of ``cu_seqlens``, then ``seq_lens`` (when given), then of ``more`` (integer tensors on the same
    device), in one read: free on the CPU, one device-to-host copy on a device."""
    parts = [cu_seqlens] + ([] if seq_lens is None else [seq_lens]) + list(more)
    return torch.cat([part.to(torch.int64) for part in parts]).tolist()


def check_offset_values(cu: list[int], lens: list[int] | None, total: int) -> None:
    """ValueError naming the first broken rule of section 5's offsets: ``cu`` (``cu_seqlens``) starts at 0, does not
    decrease and ends within the ``total`` tokens; each of ``lens`` (``seq_lens``, None: whole slots) lies in
    ``[0, slot length]``. Plain Python over the values (no tensor reads)."""
    steps = list(map(operator.sub, cu[1:], cu[:-1]))
    if cu[0] == 0 and cu[-1] <= total and min(steps, default=0) >= 0 and \
            (lens is None or (min(lens, default=0) >= 0 and all(map(operator.le, lens, steps)))):
        return  # the usual case: one pass, the details only when something is wrong
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens: expected the first offset to be 0, got {cu[0]}")
    for i, step in enumerate(steps):
        if step < 0:
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got cu_seqlens[{i}] = {cu[i]} > "
                             f"cu_seqlens[{i + 1}] = {cu[i + 1]}")
    if cu[-1] > total:
        raise ValueError(f"cu_seqlens: the last offset {cu[-1]} passes the end of hidden's {total} tokens")
    i = next(i for i, (n, step) in enumerate(zip(lens, steps)) if not 0 <= n <= step)
    raise ValueError(f"seq_lens: expected 0 <= seq_lens[i] <= the slot's length, got seq_lens[{i}] = "
                     f"{lens[i]} for a slot of {steps[i]} tokens")


def check_offsets_on_host(cu_seqlens: torch.Tensor, seq_lens: torch.Tensor | None, total: int) -> None:
    """`check_offset_values` on the tensors' values (one read, `offsets_on_host`)."""
    values = offsets_on_host(cu_seqlens, seq_lens)
    count = cu_seqlens.shape[0]
    check_offset_values(values[:count], None if seq_lens is None else values[count:], total)


OFFSETS_RULES = ("cu_seqlens / seq_lens: invalid offsets, checked on the device: expected cu_seqlens[0] = 0, "
                 "non-decreasing offsets, cu_seqlens[-1] <= the {total} tokens of hidden and 0 <= seq_lens[i] <= "
                 "cu_seqlens[i + 1] - cu_seqlens[i]")


def check_offsets_on_device(cu: torch.Tensor, lens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rules of `check_offset_values` on int64 ``cu`` ``[N+1]`` and ``lens`` ``[N]`` without reading them on the
    host: an asynchronous assertion (a device-side assert, reported at the next synchronisation; on the CPU it raises
    at once). Returns new tensors: ``cu`` and ``lens`` when they hold, else all zeros (every sequence empty), so
    the kernels queued behind the failed assertion never index memory with bad offsets."""
    steps = cu[1:] - cu[:-1]
    ok = (cu[0] == 0) & (cu[-1] <= total) & (steps >= 0).all() & (lens >= 0).all() & (lens <= steps).all()
    torch._assert_async(ok, OFFSETS_RULES.format(total=total))
    return torch.where(ok, cu, 0), torch.where(ok, lens, 0)


def offsets_in_graph(cu_seqlens: torch.Tensor, seq_lens: torch.Tensor | None, total: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The body of the op ``red_kernels::varlen_offsets``: checked int64 copies of the offsets and of the
    lengths (``seq_lens``, or each slot's length when None). On the CPU the host check and its ValueError;
    elsewhere `check_offsets_on_device`."""
    cu = cu_seqlens.to(torch.int64)
    lens = torch.diff(cu) if seq_lens is None else seq_lens.to(torch.int64)
    if cu.device.type == "cpu":
        check_offsets_on_host(cu_seqlens, seq_lens, total)
        return cu.contiguous().clone(), lens.contiguous().clone()
    return check_offsets_on_device(cu, lens, total)


def checked_offsets(cu_seqlens: torch.Tensor, seq_lens: torch.Tensor | None, total: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The offsets and lengths as the kernels take them (int64, contiguous), once their values are checked
    against ``total`` tokens, where the module docstring says: on the host in an eager call, in the graph under
    torch.compile or CUDA-graph capture."""
    if torch.compiler.is_compiling() or (cu_seqlens.is_cuda and torch.cuda.is_current_stream_capturing()):
        return torch.ops.red_kernels.varlen_offsets(cu_seqlens, seq_lens, total)
    check_offsets_on_host(cu_seqlens, seq_lens, total)
    cu = cu_seqlens.to(torch.int64)
    lens = torch.diff(cu) if seq_lens is None else seq_lens.to(torch.int64)
    return cu.contiguous(), lens.contiguous()
