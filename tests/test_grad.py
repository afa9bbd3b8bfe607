"""Gradients of the op in hidden, weight and bias, through all three float outputs."""

from __future__ import annotations

import pytest
import torch

import red_kernels
from cases import (Case, assert_gradients_match, assert_padding_never_read, forward_cases, make_inputs, op_names,
                   op_pair, upstream_gradients, weighted_loss)
from conftest import TRITON_INTERPRET, fused_cpu_backends
from red_kernels.reference import redistribute_reference

FUSED = fused_cpu_backends()
CASES = forward_cases()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fused_gradients_match_autograd_through_eager(case: Case, backend: str, poison_empty) -> None:
    assert_gradients_match(case, backend)


@pytest.mark.skipif(TRITON_INTERPRET, reason="the eager reference is checked in the normal process")
@pytest.mark.parametrize("baseline", ["prompt", "zero"])
@pytest.mark.parametrize("padding", ["right", "left", "holey", "empty-row"])
def test_gradcheck_eager_reference_float64(baseline: str, padding: str) -> None:
    inputs = make_inputs(Case(3, 7, 5, padding=padding, start="tensor", baseline=baseline, seed=21))
    hidden = inputs["hidden"].double().requires_grad_()
    weight = inputs["weight"].double().requires_grad_()
    bias = torch.randn(1, dtype=torch.float64, requires_grad=True)

    def float_outputs(hidden, weight, bias):
        return redistribute_reference(hidden, weight, bias, inputs["attention_mask"], inputs["response_start"],
                                      baseline == "zero", compute_dtype=torch.float64)[:3]

    assert torch.autograd.gradcheck(float_outputs, (hidden, weight, bias))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("wanted", ["hidden", "weight", "bias", "hidden+bias"])
def test_only_requested_gradients_are_computed(backend: str, wanted: str, poison_empty) -> None:
    """needs_input_grad reaches the kernel: what is not wanted is neither returned nor computed."""
    case = Case(2, 9, 12, bias="tensor", seed=4)
    inputs = make_inputs(case)
    hidden = inputs["hidden"].requires_grad_("hidden" in wanted)
    weight = inputs["weight"].requires_grad_("weight" in wanted)
    bias = inputs["bias"].requires_grad_("bias" in wanted)
    calls = []
    name = op_names(backend)[1]
    real = getattr(torch.ops.red_kernels, name)

    def spy(*args):
        calls.append(list(args[-1]))
        return real(*args)

    with pytest.MonkeyPatch.context() as monkey:
        monkey.setattr(torch.ops.red_kernels, name, spy)
        out = red_kernels.redistribute(hidden, weight, bias, attention_mask=inputs["attention_mask"],
                                       response_start=inputs["response_start"], backend=backend)
        (out.scores.sum() + out.rewards.sum()).backward()
    expected_mask = ["hidden" in wanted, "weight" in wanted, "bias" in wanted]
    assert calls == [expected_mask]
    for leaf, want in zip((hidden, weight, bias), expected_mask):
        assert (leaf.grad is not None) == want


@pytest.mark.parametrize("backend", FUSED)
def test_backward_op_returns_empty_for_unrequested(backend: str) -> None:
    inputs = make_inputs(Case(2, 6, 8, seed=8))
    B, T, H = 2, 6, 8
    hidden = inputs["hidden"]
    mask = (inputs["attention_mask"] != 0).to(torch.uint8)
    start = torch.full((B,), inputs["response_start"])
    out = red_kernels.redistribute(hidden, inputs["weight"], attention_mask=mask, response_start=start, backend=backend)
    grads = op_pair(backend)[1](torch.randn(B, T), torch.randn(B), torch.randn(B, T), hidden, inputs["weight"], mask, start,
               out.last_index, False, [False, True, False])
    assert grads[0].numel() == 0 and grads[2].numel() == 0 and grads[1].shape == (H,)


@pytest.mark.parametrize("backend", FUSED)
def test_padding_content_never_matters(backend: str, poison_empty) -> None:
    assert_padding_never_read(backend)


@pytest.mark.parametrize("backend", FUSED)
def test_grad_weight_is_deterministic(backend: str) -> None:
    inputs = make_inputs(Case(4, 63, 123, dtype="bf16", seed=10))
    upstream = upstream_gradients(4, 63, 1)
    results = []
    for _ in range(3):
        weight = inputs["weight"].detach().clone().requires_grad_()
        out = red_kernels.redistribute(inputs["hidden"], weight, attention_mask=inputs["attention_mask"],
                                       response_start=inputs["response_start"], backend=backend)
        weighted_loss(out, upstream).backward()
        results.append(weight.grad)
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.skipif(TRITON_INTERPRET, reason="ScoreHead runs on the default backend in the normal process")
def test_score_head_converts_a_linear_head() -> None:
    linear = torch.nn.Linear(24, 1)
    head = red_kernels.ScoreHead(24)
    assert set(head.state_dict()) == set(linear.state_dict()) == {"weight", "bias"}
    head.load_state_dict(linear.state_dict())
    inputs = make_inputs(Case(2, 7, 24, seed=12))
    out = head(inputs["hidden"], inputs["attention_mask"], inputs["response_start"])
    valid = inputs["attention_mask"] != 0
    expected = torch.where(valid, linear(inputs["hidden"]).squeeze(-1), 0.0)
    torch.testing.assert_close(out.scores, expected.detach(), rtol=1e-5, atol=1e-5)
    out.rewards.sum().backward()
    assert head.weight.grad is not None and head.bias.grad is not None
    no_bias = red_kernels.ScoreHead.from_linear(torch.nn.Linear(24, 1, bias=False))
    assert no_bias.bias is None and set(no_bias.state_dict()) == {"weight"}
    with pytest.raises(ValueError, match="linear"):
        red_kernels.ScoreHead.from_linear(torch.nn.Linear(24, 2))
