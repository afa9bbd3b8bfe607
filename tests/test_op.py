"""The forward op on every backend usable here, against the float64 spec."""

from __future__ import annotations

import pytest
import torch

import red_kernels
from cases import Case, assert_gradients_match, assert_matches, forward_cases, make_inputs
from conftest import TRITON_INTERPRET, cpu_backends, cpu_isas, fused_cpu_backends

BACKENDS = cpu_backends()
CASES = forward_cases()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_float64_spec(case: Case, backend: str, poison_empty) -> None:
    inputs = make_inputs(case)
    out = red_kernels.redistribute(**inputs, backend=backend)
    assert_matches(out, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("baseline", ["prompt", "zero"])
@pytest.mark.parametrize("padding", ["right", "left", "both"])
def test_token_rewards_telescope(backend: str, baseline: str, padding: str, poison_empty) -> None:
    """On contiguous masks a row's token rewards sum to its reward minus the baseline score."""
    case = Case(6, 33, 48, padding=padding, baseline=baseline, start="tensor", seed=7)
    inputs = make_inputs(case)
    inputs["response_start"] = torch.tensor([0, 5, 12, 20, 33, 40])
    out = red_kernels.redistribute(**inputs, backend=backend)
    for b in range(case.B):
        start = min(int(inputs["response_start"][b]), case.T)
        prompt_score = 0.0
        if baseline == "prompt" and start >= 1 and inputs["attention_mask"][b, start - 1] != 0:
            prompt_score = out.scores[b, start - 1].item()
        has_response = bool((inputs["attention_mask"][b, start:] != 0).any())
        expected = out.rewards[b].item() - prompt_score if has_response else 0.0
        assert out.token_rewards[b].sum().item() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int32, torch.int64])
def test_mask_dtypes_agree(backend: str, mask_dtype: torch.dtype, poison_empty) -> None:
    inputs = make_inputs(Case(3, 20, 16, padding="holey", seed=3))
    reference = red_kernels.redistribute(**inputs, backend=backend)
    inputs["attention_mask"] = (inputs["attention_mask"] != 0).to(mask_dtype)
    out = red_kernels.redistribute(**inputs, backend=backend)
    for got, want in zip(out, reference):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64])
def test_noncontiguous_mask_and_start(backend: str, mask_dtype: torch.dtype, poison_empty) -> None:
    """A mask stored [T, B] and a strided start tensor give what their contiguous copies give."""
    inputs = make_inputs(Case(4, 13, 24, padding="both", start="tensor", seed=13))
    expected = red_kernels.redistribute(**inputs, backend=backend)
    mask = inputs["attention_mask"].to(mask_dtype)
    inputs["attention_mask"] = mask.t().contiguous().t()
    inputs["response_start"] = torch.stack([inputs["response_start"], inputs["response_start"]], 1)[:, 0]
    assert not inputs["attention_mask"].is_contiguous() and not inputs["response_start"].is_contiguous()
    out = red_kernels.redistribute(**inputs, backend=backend)
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_as_linear_weight_and_low_precision(backend: str, poison_empty) -> None:
    """A [1, H] nn.Linear weight in bfloat16 is upcast exactly, and a bias tensor of any float dtype works."""
    inputs = make_inputs(Case(2, 11, 37, dtype="bf16", bias="tensor", seed=5))
    inputs["weight"] = inputs["weight"].to(torch.bfloat16).reshape(1, -1)
    inputs["bias"] = inputs["bias"].to(torch.float16)
    out = red_kernels.redistribute(**inputs, backend=backend)
    assert_matches(out, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend: str) -> None:
    out = red_kernels.redistribute(torch.randn(0, 5, 3), torch.randn(3), attention_mask=torch.ones(0, 5, dtype=torch.long),
                                   response_start=2, backend=backend)
    assert out.scores.shape == (0, 5) and out.rewards.shape == (0,) and out.last_index.shape == (0,)
    assert out.token_rewards.shape == (0, 5) and out.scores.dtype == torch.float32


@pytest.mark.parametrize("backend", fused_cpu_backends())
def test_offsets_beyond_int32(backend: str) -> None:
    """Rows 2^31 elements apart: the kernels must compute offsets in 64 bits.

    The storage is allocated but only the two rows read are written, so the pages in between
    are never touched and the test costs a few KiB of real memory.
    """
    H = 64
    stride_t = 2**31 + 128  # element offset of row t=1 is past 2^31
    storage = torch.empty(stride_t + H, dtype=torch.bfloat16)
    hidden = storage.as_strided((1, 2, H), (2 * stride_t, stride_t, 1))
    rows = torch.randn(2, H).to(torch.bfloat16)
    storage[:H] = rows[0]
    storage[stride_t:stride_t + H] = rows[1]
    weight = torch.randn(H)
    out = red_kernels.redistribute(hidden, weight, attention_mask=torch.ones(1, 2, dtype=torch.bool), response_start=1,
                                   backend=backend)
    expected = rows.double() @ weight.double()
    torch.testing.assert_close(out.scores[0].double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.token_rewards[0, 1].double(), expected[1] - expected[0], rtol=1e-5, atol=1e-5)


def test_backends_agree_on_auto() -> None:
    """backend='auto' on CPU tensors is the C++ kernel when it is built (docs/spec.md: auto)."""
    expected = "cpu" if "cpu" in red_kernels.available_backends("cpu") else "eager"
    assert red_kernels.op.resolve_backend("auto", torch.device("cpu")) == expected
    inputs = make_inputs(Case(2, 9, 10, seed=11))
    auto = red_kernels.redistribute(**inputs)
    explicit = red_kernels.redistribute(**inputs, backend=expected)
    for got, want in zip(auto, explicit):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.skipif(TRITON_INTERPRET, reason="C++ kernel: normal process")
@pytest.mark.parametrize("pinned_isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("threads", [1, 3, 5])
@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
def test_cpu_kernel_every_isa_and_chunking(pinned_isa: str, threads: int, dtype: str, poison_empty) -> None:
    """Each SIMD path of the C++ kernels, forward and backward (the CPU may pick any), with thread
    counts that split the flat positions mid-row, so a chunk's first token reward needs the
    recomputed halo row."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for seed, (H, padding) in enumerate([(4097, "both"), (1031, "holey"), (33, "left"), (16, "right")]):
            case = Case(3, 61, H, dtype=dtype, padding=padding, start="tensor", baseline="prompt", seed=seed)
            inputs = make_inputs(case)
            assert_matches(red_kernels.redistribute(**inputs, backend="cpu"), inputs)
            assert_gradients_match(case, "cpu", inputs=inputs)
    finally:
        torch.set_num_threads(before)
