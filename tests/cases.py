"""Test cases for the op and the float64 check: they live in red_kernels/_cases.py (shipped, so
`python -m red_kernels.check` uses the very same cases); this module keeps the tests' import path."""

from red_kernels._cases import (  # noqa: F401
    ACCUMULATION_ULPS,
    DTYPES,
    EPS32,
    PADDINGS,
    SHAPES,
    Case,
    _start_tensor,
    assert_gradients_match,
    assert_matches,
    assert_padding_never_read,
    assert_within,
    expected,
    forward_cases,
    make_inputs,
    make_mask,
    op_names,
    op_pair,
    output_rounding,
    redistribute_op,
    reference_gradients,
    to_device,
    track_worst_ratio,
    upstream_gradients,
    weighted_loss,
)
