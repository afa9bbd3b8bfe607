"""redistribute_varlen on CPU (docs/spec.md section 5): packed against padded at the same real tokens, one
pytest-benchmark group per kind, dtype and shape. B sequences of random lengths in [1, T] (mean about T/2), H:

  varlen   red_kernels.redistribute_varlen(..., backend="cpu") on the nnz real tokens packed tight ([nnz, H])
  padded   red_kernels.redistribute(..., backend="cpu") on the same sequences right-padded to [B, T, H]
  dense    the same call with every one of the B * T positions real: the work of N x max_len tokens
  compile  red_kernels.reference.redistribute_varlen_reference (fixed_order=False: a plain matrix-vector
           product, not the reference's pairwise sum) through torch.compile(dynamic=False), on the
           packed inputs the public call hands its backends; compiled and warmed up before any timing

Target (printed by report.py, not asserted): varlen's time proportional to the real tokens, i.e.
varlen / dense at most 1.15 x nnz / (B * T). The padded kernel never reads padding rows either, so its forward
already costs about the real tokens' reads plus a per-position pass, and varlen / padded sits nearer 1 there; its
backward writes grad_hidden for all B * T rows, which varlen does for nnz. Every provider's result is checked
against the float64 spec before it is timed (forward: the outputs; forward+backward: the gradients in hidden,
weight and bias).
"""

from __future__ import annotations

import functools

import pytest
import torch

import red_kernels
from providers import DTYPES, check_forward, check_gradients, dense_of, describe, warm_up
from red_kernels._cases import (ACCUMULATION_ULPS, EPS32, _varlen_reward_bound, assert_varlen_matches, assert_within,
                                output_rounding)
from red_kernels.op import RedistributeOutput
from red_kernels.reference import redistribute_varlen_reference

PROVIDERS = ("varlen", "padded", "dense", "compile")
LENGTHS_SEED = 1  # a draw whose mean length is close to T/2 (0.52 T at T = 1024)


def make_inputs(B: int, T: int, H: int, dtype: torch.dtype, seed: int = 0) -> tuple[dict, dict]:
    """The same sequences twice: right-padded (providers.make_inputs's layout) and packed tight, both in the
    layout the public calls hand their backends (float32 weight, a bias tensor, int64 offsets and starts)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=generator).to(dtype)
    weight = torch.randn(H, generator=generator) / H**0.5
    bias = torch.full((1,), 0.1)
    lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(LENGTHS_SEED))
    mask = (torch.arange(T) < lengths[:, None]).to(torch.uint8)
    start = torch.full((B,), T // 4, dtype=torch.int64)
    padded = dict(hidden=hidden, weight=weight, bias=bias, attention_mask=mask, response_start=start,
                  baseline="prompt")
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
    packed = dict(hidden=hidden[mask != 0].contiguous(), weight=weight, bias=bias, cu_seqlens=cu, seq_lens=None,
                  response_start=start, prev_scores=None, baseline="prompt")
    return padded, packed


@functools.cache
def compiled_reference():
    return torch.compile(functools.partial(redistribute_varlen_reference, fixed_order=False), dynamic=False)


def call(provider: str, hidden, weight, bias, padded: dict, packed: dict) -> RedistributeOutput:
    if provider in ("padded", "dense"):
        inputs = padded if provider == "padded" else dense_of(padded)
        return red_kernels.redistribute(hidden, weight, bias, attention_mask=inputs["attention_mask"],
                                        response_start=padded["response_start"], baseline="prompt", backend="cpu")
    cu, start = packed["cu_seqlens"], packed["response_start"]
    if provider == "compile":
        return RedistributeOutput(*compiled_reference()(hidden, weight, bias, cu, cu[1:] - cu[:-1], start, None,
                                                         False))
    return red_kernels.redistribute_varlen(hidden, weight, bias, cu_seqlens=cu, response_start=start,
                                           baseline="prompt", backend="cpu")


def inputs_of(provider: str, padded: dict, packed: dict) -> dict:
    return {"padded": padded, "dense": dense_of(padded)}.get(provider, packed)


def upstream(padded: dict, seed: int = 1) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Output gradients for the padded op, and the same values at the real tokens for the packed one."""
    B, T = padded["attention_mask"].shape
    generator = torch.Generator().manual_seed(seed)
    g = (torch.randn(B, T, generator=generator), torch.randn(B, generator=generator),
         torch.randn(B, T, generator=generator))
    real = padded["attention_mask"] != 0
    return g, (g[0][real].contiguous(), g[1], g[2][real].contiguous())


def backward_fn(provider: str, padded: dict, packed: dict, grads_out):
    """forward + backward of the loss sum(scores * g1) + sum(rewards * g2) + sum(token_rewards * g3) in hidden,
    weight and bias (as providers.backward_fn)."""
    inputs = inputs_of(provider, padded, packed)
    hidden = inputs["hidden"].detach().requires_grad_()
    weight = inputs["weight"].detach().clone().requires_grad_()
    bias = inputs["bias"].detach().clone().requires_grad_()
    g_scores, g_rewards, g_tokens = grads_out

    def run():
        out = call(provider, hidden, weight, bias, padded, packed)
        loss = (out.scores * g_scores).sum() + (out.rewards * g_rewards).sum() + (out.token_rewards * g_tokens).sum()
        return torch.autograd.grad(loss, (hidden, weight, bias))
    return run


def check_varlen_gradients(grads, packed: dict, grads_out) -> None:
    """Packed gradients versus autograd through the float64 varlen reference, with the bounds of
    red_kernels._cases.assert_varlen_gradients_match (every packed token is real here)."""
    grad_hidden, grad_weight, grad_bias = grads
    cu, start = packed["cu_seqlens"], packed["response_start"]
    leaves = [packed["hidden"].double().requires_grad_(), packed["weight"].double().requires_grad_(),
              packed["bias"].double().requires_grad_()]
    out = redistribute_varlen_reference(*leaves, cu, cu[1:] - cu[:-1], start, None, False,
                                        compute_dtype=torch.float64)
    loss = sum((o * g.double()).sum() for o, g in zip(out[:3], grads_out))
    want_hidden, want_weight, want_bias = torch.autograd.grad(loss, leaves)
    first = torch.zeros(packed["hidden"].shape[0], dtype=torch.bool)
    first[cu[:-1]] = True  # token t+1's reward is in t's gradient unless t+1 starts the next sequence
    next_token = torch.nn.functional.pad(grads_out[2].abs()[1:], (0, 1)).masked_fill(
        torch.nn.functional.pad(first[1:], (0, 1), value=True), 0)
    g_bound = (grads_out[0].abs() + grads_out[2].abs() + next_token
               + _varlen_reward_bound(packed, grads_out[1])).double()
    dtype = packed["hidden"].dtype
    assert grad_hidden.dtype == dtype and grad_hidden.shape == packed["hidden"].shape
    tol_hidden = (4 * EPS32 * g_bound[:, None] * packed["weight"].double().abs()
                  + output_rounding(dtype) * want_hidden.abs())
    assert_within("grad_hidden", grad_hidden, want_hidden, tol_hidden)
    tol_weight = ACCUMULATION_ULPS * EPS32 * (g_bound @ packed["hidden"].double().abs()) + 1e-30
    assert_within("grad_weight", grad_weight, want_weight, tol_weight)
    tol_bias = ACCUMULATION_ULPS * EPS32 * g_bound.sum().reshape(1) + 1e-30
    assert_within("grad_bias", grad_bias.reshape(1), want_bias, tol_bias)


def describe_varlen(benchmark, kind: str, provider: str, dtype: str, shape, padded: dict, packed: dict) -> None:
    describe(benchmark, kind, provider, dtype, shape, inputs_of(provider, padded, packed)["hidden"],
             nnz=packed["hidden"].shape[0])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_varlen_forward(benchmark, shape, dtype, provider):
    padded, packed = make_inputs(*shape, DTYPES[dtype])
    inputs = inputs_of(provider, padded, packed)
    fn = functools.partial(call, provider, inputs["hidden"], inputs["weight"], inputs["bias"], padded, packed)
    describe_varlen(benchmark, "varlen forward", provider, dtype, shape, padded, packed)
    with torch.inference_mode():
        out = warm_up(fn)
        if provider in ("padded", "dense"):
            check_forward("cpu", out, inputs)
        else:
            assert_varlen_matches(out, packed)
        benchmark(fn)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_varlen_forward_backward(benchmark, shape, dtype, provider):
    padded, packed = make_inputs(*shape, DTYPES[dtype])
    grads_padded, grads_packed = upstream(padded)
    grads_out = grads_padded if provider in ("padded", "dense") else grads_packed
    fn = backward_fn(provider, padded, packed, grads_out)
    describe_varlen(benchmark, "varlen forward+backward", provider, dtype, shape, padded, packed)
    grads = warm_up(fn)
    if provider in ("padded", "dense"):
        check_gradients(grads, inputs_of(provider, padded, packed), grads_out)
    else:
        check_varlen_gradients(grads, packed, grads_out)
    benchmark(fn)
