"""Inputs and providers shared by the CPU op benchmarks (test_op_cpu.py, test_grad_cpu.py).

Every provider computes the same op on the same inputs:
  cpu      red_kernels.redistribute(..., backend="cpu"), the whole public call
  eager    red_kernels.redistribute(..., backend="eager"), the plain PyTorch reference
  compile  red_kernels.reference.redistribute_reference through torch.compile(dynamic=False),
           called on the inputs the public call hands every backend (float32 weight, a bias
           tensor, a uint8 mask, an int64 start); compiled and warmed up before any timing
  dense    (forward only) `cpu` on the same hidden with every position real (an all-ones mask), so
           it reads every byte of hidden, as `read` does
  read     (forward only) one plain read of the same bytes of hidden: torch.sum over them viewed
           as float32, a streaming, vectorised, multi-threaded reduction; the floor for any op
           that reads hidden once

The forward suite times `read` once more before every round of every other provider (paired_with_floor),
so each round's ratio to the floor is taken a few milliseconds apart: on these shared VMs the memory
bandwidth drifts by up to 3x within minutes, more than the differences being measured.
"""

from __future__ import annotations

import functools
import statistics
import time

import torch

import red_kernels
from red_kernels._cases import ACCUMULATION_ULPS, EPS32, assert_within, output_rounding, reference_gradients
from red_kernels.op import RedistributeOutput
from red_kernels.reference import redistribute_reference

FORWARD_PROVIDERS = ("cpu", "dense", "eager", "compile", "read")
PAIRED_ROUNDS = 40  # rounds of a forward benchmark, each after one timed read of the floor
BACKWARD_PROVIDERS = ("cpu", "eager", "compile")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
WARMUP_CALLS = 3  # after the first (compiling) call


def make_inputs(B: int, T: int, H: int, dtype: torch.dtype, seed: int = 0) -> dict:
    """Right-padded sequences of random lengths in [T/2, T], responses from T/4, a bias tensor:
    in the layout red_kernels.redistribute hands its backends, so no provider times a conversion."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=generator).to(dtype)
    weight = torch.randn(H, generator=generator) / H**0.5
    bias = torch.full((1,), 0.1)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=generator)
    mask = (torch.arange(T) < lengths[:, None]).to(torch.uint8)
    start = torch.full((B,), T // 4, dtype=torch.int64)
    return dict(hidden=hidden, weight=weight, bias=bias, attention_mask=mask, response_start=start, baseline="prompt")


def dense_of(inputs: dict) -> dict:
    """The same inputs with every position real (provider `dense`)."""
    return {**inputs, "attention_mask": torch.ones_like(inputs["attention_mask"])}


def describe(benchmark, kind: str, provider: str, dtype: str, shape, hidden: torch.Tensor, **more) -> None:
    """The benchmark's group and the extra_info report.py reads (the same keys in every suite)."""
    B, T, H = shape
    benchmark.group = f"{kind} {dtype} B={B} T={T} H={H}"
    benchmark.extra_info.update(kind=kind, provider=provider, dtype=dtype, B=B, T=T, H=H,
                                hidden_bytes=hidden.numel() * hidden.element_size(),
                                threads=torch.get_num_threads(), **more)


def paired_with_floor(benchmark, fn, inputs: dict, rounds: int = PAIRED_ROUNDS) -> None:
    """Time ``fn`` with pytest-benchmark, one call a round, each round right after one timed read of the
    floor (`read`); record the median and quartiles of the rounds' ratios fn / floor in extra_info
    ("floor_ratio"). Timing happens only when the benchmark is enabled (not under --benchmark-disable)."""
    floor, floor_times = forward_fn("read", inputs), []

    def time_floor():
        start = time.perf_counter()
        floor()
        floor_times.append(time.perf_counter() - start)

    benchmark.pedantic(fn, setup=time_floor, rounds=rounds, iterations=1)
    times = benchmark.stats.stats.data if getattr(benchmark, "stats", None) else []
    if times:
        assert len(times) == len(floor_times), "pytest-benchmark ran a round without its floor read"
        q1, median, q3 = statistics.quantiles([t / f for t, f in zip(times, floor_times)], n=4)
        benchmark.extra_info["floor_ratio"] = dict(median=median, q1=q1, q3=q3, rounds=len(times),
                                                   floor_median=statistics.median(floor_times))


@functools.cache
def compiled_reference():
    """One compiled function for every shape and dtype (dynamic=False: one graph per shape, each
    compiled on its first call, which the benchmarks make before timing)."""
    return torch.compile(redistribute_reference, dynamic=False)


def call(provider: str, hidden, weight, bias, inputs: dict) -> RedistributeOutput:
    if provider == "compile":
        return RedistributeOutput(*compiled_reference()(hidden, weight, bias, inputs["attention_mask"],
                                                         inputs["response_start"], inputs["baseline"] == "zero"))
    return red_kernels.redistribute(hidden, weight, bias, attention_mask=inputs["attention_mask"],
                                    response_start=inputs["response_start"], baseline=inputs["baseline"],
                                    backend=provider)


def forward_fn(provider: str, inputs: dict):
    """A no-argument callable running one forward of ``provider`` (inference mode is the caller's)."""
    if provider == "read":
        as_float_words = inputs["hidden"].view(-1).view(torch.float32)  # the same bytes, whatever the dtype
        return lambda: torch.sum(as_float_words)
    if provider == "dense":
        every_position = dense_of(inputs)
        return lambda: call("cpu", inputs["hidden"], inputs["weight"], inputs["bias"], every_position)
    return lambda: call(provider, inputs["hidden"], inputs["weight"], inputs["bias"], inputs)


def upstream(B: int, T: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, generator=generator), torch.randn(B, generator=generator),
            torch.randn(B, T, generator=generator))


def backward_fn(provider: str, inputs: dict, grads_out: tuple[torch.Tensor, ...]):
    """A callable running forward + backward of ``provider``: the loss
    sum(scores * g1) + sum(rewards * g2) + sum(token_rewards * g3) (a critic or reward-model training
    step's head) differentiated in hidden, weight and bias; returns the three gradients."""
    hidden = inputs["hidden"].detach().requires_grad_()
    weight = inputs["weight"].detach().clone().requires_grad_()
    bias = inputs["bias"].detach().clone().requires_grad_()
    g_scores, g_rewards, g_tokens = grads_out

    def run():
        out = call(provider, hidden, weight, bias, inputs)
        loss = (out.scores * g_scores).sum() + (out.rewards * g_rewards).sum() + (out.token_rewards * g_tokens).sum()
        return torch.autograd.grad(loss, (hidden, weight, bias))
    return run


def check_forward(provider: str, out, inputs: dict) -> None:
    """The provider's outputs versus the float64 spec (red_kernels._cases.assert_matches)."""
    from red_kernels._cases import assert_matches

    if provider == "read":
        words = inputs["hidden"].view(-1).view(torch.float32).double()
        error, bound = (out.double() - words.sum()).abs().item(), ACCUMULATION_ULPS * EPS32 * words.abs().sum().item()
        assert error <= bound, f"read: float32 sum off by {error:.3g}, more than float32 accumulation's {bound:.3g}"
        return
    assert_matches(out, dense_of(inputs) if provider == "dense" else inputs)


def check_gradients(grads, inputs: dict, grads_out) -> None:
    """Gradients versus autograd through the float64 reference, with the bounds tests/test_grad.py uses
    (red_kernels._cases.assert_gradients_match): float32 rounding of the per-position gradient, the
    rounding of grad_hidden to its dtype, float32 accumulation in grad_weight and grad_bias."""
    grad_hidden, grad_weight, grad_bias = grads
    want_hidden, want_weight, want_bias = reference_gradients(inputs, grads_out)
    valid = (inputs["attention_mask"] != 0).double()
    g_bound = valid * (grads_out[0].abs() + grads_out[1].abs()[:, None] + grads_out[2].abs()
                       + torch.nn.functional.pad(grads_out[2].abs()[:, 1:], (0, 1))).double()
    dtype = inputs["hidden"].dtype
    assert grad_hidden.dtype == dtype and grad_hidden.shape == inputs["hidden"].shape
    tol_hidden = (4 * EPS32 * g_bound[..., None] * inputs["weight"].double().abs()
                  + output_rounding(dtype) * want_hidden.abs())
    assert_within("grad_hidden", grad_hidden, want_hidden, tol_hidden)
    x_abs = inputs["hidden"].double().abs()
    tol_weight = ACCUMULATION_ULPS * EPS32 * torch.einsum("bt,bth->h", g_bound, x_abs) + 1e-30
    assert_within("grad_weight", grad_weight, want_weight, tol_weight)
    tol_bias = ACCUMULATION_ULPS * EPS32 * g_bound.sum().reshape(1) + 1e-30
    assert_within("grad_bias", grad_bias.reshape(1), want_bias, tol_bias)


def warm_up(fn, calls: int = WARMUP_CALLS):
    """The first call (which compiles, for `compile`) and ``calls`` more; returns the last result."""
    result = fn()
    for _ in range(calls):
        result = fn()
    return result
