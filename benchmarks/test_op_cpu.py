"""The op's forward on CPU: `cpu` against `eager`, `compile` and the read floor (providers.py says what
each is), one pytest-benchmark group per dtype and shape.

Targets (printed by report.py, not asserted): forward within 1.15x of the read floor and ahead of
`compile` in every dtype (issue 16); bf16 >= 5x faster than eager, fp32 >= 1.5x (issue 2).
Every provider's result is checked against the float64 spec before it is timed.
"""

from __future__ import annotations

import pytest
import torch

from providers import DTYPES, FORWARD_PROVIDERS, check_forward, forward_fn, make_inputs, warm_up


@pytest.mark.parametrize("provider", FORWARD_PROVIDERS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_forward(benchmark, shape, dtype, provider):
    B, T, H = shape
    inputs = make_inputs(B, T, H, DTYPES[dtype])
    fn = forward_fn(provider, inputs)
    benchmark.group = f"forward {dtype} B={B} T={T} H={H}"
    benchmark.extra_info.update(kind="forward", provider=provider, dtype=dtype, B=B, T=T, H=H,
                                hidden_bytes=inputs["hidden"].numel() * inputs["hidden"].element_size(),
                                threads=torch.get_num_threads())
    with torch.inference_mode():
        check_forward(provider, warm_up(fn), inputs)
        benchmark(fn)
