"""The op's forward on CPU: `cpu` against `eager`, `compile` and the read floor (providers.py says what
each is), one pytest-benchmark group per dtype and shape.

Targets (printed by report.py, not asserted): forward within 1.15x of the read floor and ahead of
`compile` in every dtype (issue 16), for `cpu` on the benchmark's padded batch and for `dense` (every
position real, so every byte of hidden read); bf16 >= 5x faster than eager, fp32 >= 1.5x (issue 2).
The ratio to the floor is paired: the floor is timed before each round (providers.paired_with_floor).
Every provider's result is checked against the float64 spec before it is timed.
"""

from __future__ import annotations

import pytest
import torch

from providers import (DTYPES, FORWARD_PROVIDERS, check_forward, describe, forward_fn, make_inputs,
                       paired_with_floor, warm_up)


@pytest.mark.parametrize("provider", FORWARD_PROVIDERS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_forward(benchmark, shape, dtype, provider):
    inputs = make_inputs(*shape, DTYPES[dtype])
    fn = forward_fn(provider, inputs)
    describe(benchmark, "forward", provider, dtype, shape, inputs["hidden"],
             real_share=inputs["attention_mask"].float().mean().item() if provider != "dense" else 1.0)
    with torch.inference_mode():
        check_forward(provider, warm_up(fn), inputs)
        if provider == "read":
            benchmark(fn)
        else:
            paired_with_floor(benchmark, fn, inputs)
