"""Edges of the op that outside tests found: non-finite padding in gradients, uint64 starts.

* A padded position contributes exactly 0 to every gradient whatever ``hidden`` holds
  there (NaN, +Inf, -Inf), on every backend, eager included; the forward outputs are the
  ones the same inputs give with finite padding, bit for bit.
* ``response_start`` as a uint64 tensor with values >= 2^63 is clamped to T (no response),
  not wrapped negative and clamped to 0 (the whole row as response).
"""

from __future__ import annotations

import pytest
import torch

import red_kernels
from cases import Case, make_inputs, upstream_gradients, weighted_loss
from conftest import cpu_backends

BACKENDS = cpu_backends()


def _gradients(hidden, weight, bias, inputs, backend):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_()
    out = red_kernels.redistribute(hidden, weight, bias, attention_mask=inputs["attention_mask"],
                                   response_start=inputs["response_start"], baseline=inputs["baseline"],
                                   backend=backend)
    B, T = inputs["attention_mask"].shape
    weighted_loss(out, upstream_gradients(B, T, seed=3)).backward()
    return out, (hidden.grad, weight.grad, bias.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_non_finite_padding_contributes_exactly_zero(backend, poison, dtype):
    inputs = make_inputs(Case(3, 11, 9, dtype=dtype, padding="holey", start="tensor", seed=5))
    bias = torch.randn(1)
    padded = inputs["attention_mask"] == 0
    assert padded.any() and not padded.all()
    clean = inputs["hidden"].clone()
    clean[padded] = 0.0
    poisoned = inputs["hidden"].clone()
    poisoned[padded] = float(poison)

    out_clean, grads_clean = _gradients(clean, inputs["weight"], bias, inputs, backend)
    out_poisoned, grads_poisoned = _gradients(poisoned, inputs["weight"], bias, inputs, backend)
    for name, a, b in zip(out_clean._fields, out_clean, out_poisoned):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"{name} depends on what padding holds")
    for name, a, b in zip(("grad_hidden", "grad_weight", "grad_bias"), grads_clean, grads_poisoned):
        assert torch.isfinite(b).all(), f"{name} is not finite with {poison} in padding ({backend})"
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"{name} depends on what padding holds")
    assert (grads_poisoned[0][padded] == 0).all()


def test_minimal_nan_padding_case_gives_zero_weight_gradient():
    """The smallest case found: B = T = H = 1, mask [[0]], hidden NaN, on every backend."""
    for backend in BACKENDS:
        hidden = torch.full((1, 1, 1), float("nan"), requires_grad=True)
        weight = torch.randn(1, requires_grad=True)
        out = red_kernels.redistribute(hidden, weight, attention_mask=torch.tensor([[0]]), response_start=0,
                                       backend=backend)
        (out.scores.sum() + out.rewards.sum() + out.token_rewards.sum()).backward()
        assert weight.grad.item() == 0.0 and hidden.grad.item() == 0.0, backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint64_response_start_beyond_int64_is_clamped_to_T(backend):
    B, T, H = 4, 6, 5
    generator = torch.Generator().manual_seed(11)
    hidden, weight = torch.randn(B, T, H, generator=generator), torch.randn(H, generator=generator)
    mask = torch.ones(B, T, dtype=torch.long)
    huge = torch.tensor([2**63, 2**64 - 1, 2**63 + 5, 2], dtype=torch.uint64)
    same = torch.tensor([T, T, T, 2], dtype=torch.int64)
    got = red_kernels.redistribute(hidden, weight, attention_mask=mask, response_start=huge, backend=backend)
    want = red_kernels.redistribute(hidden, weight, attention_mask=mask, response_start=same, backend=backend)
    for name, a, b in zip(got._fields, got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert (got.token_rewards[:3] == 0).all() and (got.token_rewards[3, 2:] != 0).all()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32, torch.int16, torch.int32])
def test_other_integer_response_starts_are_read_as_their_values(dtype):
    B, T, H = 3, 6, 4
    generator = torch.Generator().manual_seed(12)
    hidden, weight = torch.randn(B, T, H, generator=generator), torch.randn(H, generator=generator)
    mask = torch.ones(B, T, dtype=torch.long)
    values = [0, 3, 200 if dtype in (torch.uint8, torch.int16) else 70000 if dtype != torch.uint16 else 60000]
    got = red_kernels.redistribute(hidden, weight, attention_mask=mask, response_start=torch.tensor(values).to(dtype),
                                   backend="eager")
    want = red_kernels.redistribute(hidden, weight, attention_mask=mask, response_start=torch.tensor([0, 3, T]),
                                    backend="eager")
    torch.testing.assert_close(got.token_rewards, want.token_rewards, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed"])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_eager_scores_are_the_plain_product_bit_for_bit(layout, dtype):
    """Zeroing padding before the product leaves the eager forward as it was: for every layout
    it equals the head applied to hidden as given, then masked, to the last bit."""
    inputs = make_inputs(Case(4, 63, 123, dtype=dtype, padding="holey", layout=layout, bias="tensor", seed=8))
    hidden, weight, bias, mask = inputs["hidden"], inputs["weight"], inputs["bias"], inputs["attention_mask"]
    out = red_kernels.redistribute(hidden, weight, bias, attention_mask=mask, response_start=0, backend="eager")
    plain = torch.where(mask != 0, hidden.float() @ weight + bias, 0.0)
    torch.testing.assert_close(out.scores, plain, rtol=0, atol=0)
