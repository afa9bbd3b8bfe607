"""The Triton backward's 16-bit grad_hidden is float32 g * w rounded to nearest even, to the bit.

Upstream gradients are multiples of 2^-6 below 8 in magnitude, so g (a sum of at most four of them) is exact
in float32 and in float64, and g * w is exact in float64: the float64 reference's grad_hidden rounded to float32
is the kernel's dx, and rounded on to the hidden dtype (round to nearest even, as a GPU's cvt.rn and torch do)
it is the one right answer. Under the Triton interpreter this checks the kernel's own rounding, not the
interpreter's float32 -> bfloat16 cast (which truncates).
"""

from __future__ import annotations

import pytest
import torch

from cases import (DTYPES, Case, VarlenCase, make_inputs, make_varlen_inputs, redistribute_op, redistribute_varlen_op,
                   reference_gradients, weighted_loss)
from conftest import cpu_backends
from red_kernels._cases import _varlen_reference_args
from red_kernels.op import flatten_packed
from red_kernels.reference import redistribute_varlen_reference

TRITON = [name for name in cpu_backends() if name == "triton"]
TRITON_VARLEN = [name for name in cpu_backends(varlen=True) if name == "triton"]


def dyadic_upstream(generator: torch.Generator, *shapes) -> tuple[torch.Tensor, ...]:
    """Random upstream gradients k / 64 with |k| < 512: their sums of four are exact in float32."""
    return tuple(torch.randint(-511, 512, shape, generator=generator).float() / 64 for shape in shapes)


def assert_rounded_to_nearest_even(grad_hidden: torch.Tensor, want: torch.Tensor) -> None:
    expected = want.float().to(grad_hidden.dtype)
    wrong = grad_hidden != expected
    assert int(wrong.sum()) == 0, (f"grad_hidden: {int(wrong.sum())} of {wrong.numel()} elements are not float32 g * w "
                             f"rounded to nearest even, e.g. {grad_hidden[wrong][:4].tolist()} instead of "
                             f"{expected[wrong][:4].tolist()} (float32 {want.float()[wrong][:4].tolist()})")


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("case", [Case(4, 63, 123, padding="holey", start="tensor", seed=31),
                                  Case(2, 40, 136, padding="left", baseline="zero", seed=32)],
                         ids=["B4-T63-H123-holey", "B2-T40-H136-left-zero"])
def test_triton_grad_hidden_is_rounded_to_nearest_even(case: Case, dtype: str, backend: str) -> None:
    case = Case(case.B, case.T, case.H, dtype=dtype, padding=case.padding, start=case.start, baseline=case.baseline,
                seed=case.seed)
    inputs = make_inputs(case)
    upstream = dyadic_upstream(torch.Generator().manual_seed(case.seed), (case.B, case.T), (case.B,),
                               (case.B, case.T))
    hidden = inputs["hidden"].detach().requires_grad_()
    weighted_loss(redistribute_op(hidden, inputs["weight"], inputs["bias"], inputs, backend), upstream).backward()
    assert hidden.grad.dtype == DTYPES[dtype]
    assert_rounded_to_nearest_even(hidden.grad, reference_gradients(inputs, upstream)[0])


@pytest.mark.parametrize("backend", TRITON_VARLEN)
@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
def test_triton_packed_grad_hidden_is_rounded_to_nearest_even(dtype: str, backend: str) -> None:
    case = VarlenCase((17, 4, 0, 30), 136, dtype=dtype, layout="1TH", tail=3, baseline="zero", seed=33)
    inputs = make_varlen_inputs(case)
    T, N = flatten_packed(inputs["hidden"]).shape[0], len(case.lengths)
    upstream = dyadic_upstream(torch.Generator().manual_seed(case.seed), (T,), (N,), (T,))
    hidden = inputs["hidden"].detach().requires_grad_()
    weighted_loss(redistribute_varlen_op(hidden, inputs["weight"], inputs["bias"], inputs, backend),
                  upstream).backward()
    args = list(_varlen_reference_args(inputs))
    args[0] = args[0].detach().double().requires_grad_()
    want = torch.autograd.grad(weighted_loss(redistribute_varlen_reference(*args, compute_dtype=torch.float64),
                                             upstream), args[0])[0]
    assert hidden.grad.dtype == DTYPES[dtype]
    assert_rounded_to_nearest_even(flatten_packed(hidden.grad), want)
