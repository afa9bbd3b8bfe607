"""Property tests of the op (hypothesis): random valid calls against the float64 spec, random
invalid calls against the input rules.

Valid draws vary B (0 included), T, H, the hidden dtype and layout (contiguous, every other
position, stored [T, B, H]), the mask (dtype, pattern, transposed storage), response_start (an
int, or a tensor of int64, int32, uint8 or uint64 with values below 0 and beyond T, up to
2^64 - 1), bias, baseline, and what padding holds (finite, NaN, +Inf, -Inf). The expected values
come from the spec in float64 on the same inputs with padding zeroed and starts clamped to
[0, T] in Python, so a poisoned padding that leaks, or a start that wraps, fails. Gradients of
all three float outputs go against float64 autograd the same way.

Invalid draws break one rule of docs/spec.md section 2 and must raise ValueError or TypeError whose
message starts with the argument's name. Draws are derandomized, so CI sees the same ones.
"""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import red_kernels  # noqa: E402
from cases import (ACCUMULATION_ULPS, EPS32, assert_matches, assert_within, output_rounding,  # noqa: E402
                   reference_gradients, upstream_gradients, weighted_loss)
from conftest import TRITON_INTERPRET, cpu_backends  # noqa: E402

BACKENDS = cpu_backends()
# The Triton interpreter runs kernels in Python, so it gets fewer draws.
VALID_DRAWS = 40 if TRITON_INTERPRET else 200
INVALID_DRAWS = 20 if TRITON_INTERPRET else 100
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
START_DTYPES = {"int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "uint64": torch.uint64}
MASK_DTYPES = {"bool": torch.bool, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8}
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def valid_calls(draw):
    B = draw(st.sampled_from([0, 1, 2, 2, 3, 3, 4, 4]))  # hypothesis would favour B = 0 from st.integers
    T, H = draw(st.integers(1, 12)), draw(st.sampled_from([1, 2, 3, 7, 16, 33, 70]))
    dtype = draw(st.sampled_from(list(DTYPES)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    layout = draw(st.sampled_from(["contiguous", "strided", "transposed"]))
    if layout == "strided":  # every other position of a longer sequence
        hidden = torch.randn(B, 2 * T, H, generator=g).to(DTYPES[dtype])[:, ::2]
    elif layout == "transposed":  # stored [T, B, H]
        hidden = torch.randn(T, B, H, generator=g).to(DTYPES[dtype]).transpose(0, 1)
    else:
        hidden = torch.randn(B, T, H, generator=g).to(DTYPES[dtype])

    pattern = draw(st.sampled_from(["random", "right", "left", "all", "none"]))
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    positions = torch.arange(T)
    real = {"random": torch.rand(B, T, generator=g) < 0.6, "right": positions < lengths[:, None],
            "left": positions >= T - lengths[:, None], "all": torch.ones(B, T, dtype=torch.bool),
            "none": torch.zeros(B, T, dtype=torch.bool)}[pattern]
    mask_dtype = MASK_DTYPES[draw(st.sampled_from(list(MASK_DTYPES)))]
    mask = real.to(mask_dtype) if mask_dtype == torch.bool else real.to(mask_dtype) * torch.randint(
        1, 4, (B, T), generator=g).to(mask_dtype)
    if draw(st.booleans()):  # stored [T, B]
        mask = mask.t().contiguous().t()

    poison = draw(st.sampled_from(["finite", "nan", "inf", "-inf"]))
    if poison != "finite":
        hidden[~real] = float(poison)

    start_kind = draw(st.sampled_from(["int"] + list(START_DTYPES)))
    if start_kind == "int":
        start = draw(st.integers(0, T))
        clamped = torch.full((B,), start, dtype=torch.int64)
    else:
        dtype_info = torch.iinfo(START_DTYPES[start_kind])
        low = max(dtype_info.min, -5)
        # Near the range, anywhere in the dtype, and its upper half (uint64: >= 2^63, which wraps in int64).
        values = draw(st.lists(st.one_of(st.integers(low, T + 3), st.integers(low, dtype_info.max),
                                         st.integers(dtype_info.max // 2 + 1, dtype_info.max)),
                               min_size=B, max_size=B))
        start = torch.tensor(values, dtype=START_DTYPES[start_kind])
        clamped = torch.tensor([min(max(v, 0), T) for v in values], dtype=torch.int64)

    bias = draw(st.sampled_from(["none", "float", "tensor"]))
    bias = {"none": None, "float": 0.375, "tensor": torch.randn(1, generator=g)}[bias]
    weight = torch.randn(H, generator=g) / H ** 0.5
    if draw(st.booleans()):
        weight = weight.reshape(1, H)
    baseline = draw(st.sampled_from(["prompt", "zero"]))
    return dict(hidden=hidden, weight=weight, bias=bias, attention_mask=mask, response_start=start,
                baseline=baseline, real=real, clamped=clamped, seed=seed)


def _spec_inputs(call: dict) -> dict:
    """The same call as the spec reads it: padding zeroed, starts clamped in Python."""
    clean = call["hidden"].clone()
    clean[~call["real"]] = 0
    return dict(hidden=clean, weight=call["weight"], bias=call["bias"], attention_mask=call["real"],
                response_start=call["clamped"], baseline=call["baseline"])


def _run(call: dict, backend: str, hidden=None, weight=None, bias=None):
    return red_kernels.redistribute(call["hidden"] if hidden is None else hidden,
                                    call["weight"] if weight is None else weight,
                                    call["bias"] if bias is None else bias,
                                    attention_mask=call["attention_mask"], response_start=call["response_start"],
                                    baseline=call["baseline"], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=VALID_DRAWS, **SETTINGS)
@given(call=valid_calls())
def test_outputs_match_the_float64_spec(backend, call):
    out = _run(call, backend)
    assert_matches(out, _spec_inputs(call))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=VALID_DRAWS, **SETTINGS)
@given(call=valid_calls())
def test_gradients_match_float64_autograd(backend, call):
    """Gradients on the drawn inputs (poisoned padding, raw starts) against float64 autograd
    through the spec on the clean inputs, within the bounds of tests/cases.py."""
    B, T = call["real"].shape
    upstream = upstream_gradients(B, T, call["seed"])
    hidden = call["hidden"].detach().requires_grad_()
    weight = call["weight"].detach().clone().requires_grad_()
    bias = call["bias"].detach().clone().requires_grad_() if isinstance(call["bias"], torch.Tensor) else None
    out = _run(call, backend, hidden, weight, bias if bias is not None else call["bias"])
    weighted_loss(out, upstream).backward()
    spec = _spec_inputs(call)
    want_hidden, want_weight, want_bias = reference_gradients(spec, upstream)

    valid = call["real"].double()
    g_bound = valid * (upstream[0].abs() + upstream[1].abs()[:, None] + upstream[2].abs()
                       + torch.nn.functional.pad(upstream[2].abs()[:, 1:], (0, 1))).double()
    w_abs = call["weight"].double().abs().reshape(-1)
    tol_hidden = (4 * EPS32 * g_bound[..., None] * w_abs + output_rounding(hidden.dtype)
                  * want_hidden.abs() + (2.0**-24 if hidden.dtype == torch.float16 else 0.0))
    assert hidden.grad.dtype == hidden.dtype and hidden.grad.shape == hidden.shape
    assert_within("grad_hidden", hidden.grad, want_hidden, tol_hidden)
    assert (hidden.grad[~call["real"]] == 0).all(), "gradient flowed into padding"
    x_abs = spec["hidden"].double().abs()
    tol_weight = ACCUMULATION_ULPS * EPS32 * torch.einsum("bt,bth->h", g_bound, x_abs) + 1e-30
    assert weight.grad.shape == weight.shape
    assert_within("grad_weight", weight.grad.reshape(-1), want_weight, tol_weight)
    if bias is not None:
        tol_bias = ACCUMULATION_ULPS * EPS32 * g_bound.sum().reshape(1) + 1e-30
        assert_within("grad_bias", bias.grad.reshape(1), want_bias, tol_bias)


def _good(B=2, T=5, H=4) -> dict:
    return dict(hidden=torch.randn(B, T, H), weight=torch.randn(H), bias=None,
                attention_mask=torch.ones(B, T, dtype=torch.long), response_start=1, baseline="prompt")


# One broken rule each: (argument named first in the message, the change, given B=2, T=5, H=4).
VIOLATIONS = {
    "hidden": [lambda: [[0.5]], lambda: torch.randn(2, 5), lambda: torch.randn(2, 5, 4, 1),
               lambda: torch.ones(2, 5, 4, dtype=torch.int64), lambda: torch.randn(2, 5, 4, dtype=torch.float64),
               lambda: torch.randn(2, 5, 4).to_sparse(), lambda: torch.randn(2, 0, 4)],
    "weight": [lambda: torch.randn(5), lambda: torch.randn(4, 1), lambda: torch.ones(4, dtype=torch.int32),
               lambda: [1.0] * 4, lambda: torch.randn(4).to_sparse(), lambda: torch.randn(4, device="meta")],
    "bias": [lambda: torch.randn(2), lambda: "0.5", lambda: True, lambda: torch.ones(1, dtype=torch.long),
             lambda: torch.randn(1, device="meta")],
    "attention_mask": [lambda: torch.ones(2, 6), lambda: torch.ones(2, 6, dtype=torch.long),
                       lambda: torch.ones(5, 2, dtype=torch.long), lambda: [[1] * 5] * 2,
                       lambda: torch.ones(2, 5, dtype=torch.long).to_sparse(),
                       lambda: torch.ones(2, 5, dtype=torch.long, device="meta")],
    "response_start": [lambda: -1, lambda: 6, lambda: 2.0, lambda: True, lambda: torch.tensor([1, 2, 3]),
                       lambda: torch.tensor([1.0, 2.0]), lambda: torch.tensor([True, False]),
                       lambda: torch.tensor([1, 2]).to_sparse(), lambda: "1"],
    "baseline": [lambda: "mean", lambda: None, lambda: "x" * 10_000],
    "backend": [lambda: "tpu", lambda: "cuda", lambda: 3],
}


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=INVALID_DRAWS, **SETTINGS)
@given(argument=st.sampled_from(list(VIOLATIONS)), data=st.data())
def test_invalid_calls_raise_naming_the_argument(backend, argument, data):
    make = data.draw(st.sampled_from(VIOLATIONS[argument]))
    kwargs = {**_good(), "backend": backend, argument: make()}
    hidden, weight, bias = kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("bias")
    with pytest.raises((ValueError, TypeError)) as raised:
        red_kernels.redistribute(hidden, weight, bias, **kwargs)
    message = str(raised.value)
    # A device mismatch is phrased "weight is on meta, hidden on cpu: ...".
    assert message.startswith((f"{argument}:", f"{argument} is on")), message
    assert len(message) < 500, f"{len(message)}-character message"
