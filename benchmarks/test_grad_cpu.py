"""The op's forward + backward on CPU: `cpu` (its fused backward kernel) against autograd through
`eager` and through `compile` (providers.py), one pytest-benchmark group per dtype and shape. The loss
sum(scores * g1) + sum(rewards * g2) + sum(token_rewards * g3) is differentiated in hidden, weight and bias.

Target (printed by report.py, not asserted): `cpu` at least 1.0x the faster of `compile` and `eager`
(issue 16); bf16 >= 3x faster than eager (issue 4). Every provider's gradients are checked against
autograd through the float64 reference before they are timed.
"""

from __future__ import annotations

import pytest

from providers import BACKWARD_PROVIDERS, DTYPES, backward_fn, check_gradients, describe, make_inputs, upstream, warm_up


@pytest.mark.parametrize("provider", BACKWARD_PROVIDERS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_forward_backward(benchmark, shape, dtype, provider):
    B, T, H = shape
    inputs = make_inputs(B, T, H, DTYPES[dtype])
    grads_out = upstream(B, T)
    fn = backward_fn(provider, inputs, grads_out)
    describe(benchmark, "forward+backward", provider, dtype, shape, inputs["hidden"])
    check_gradients(warm_up(fn), inputs, grads_out)
    benchmark(fn)
