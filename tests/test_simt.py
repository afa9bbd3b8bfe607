"""The CUDA kernels' own source, executed on the CPU by the host SIMT harness (csrc/simt/README.md).

csrc/cuda/redistribute_kernels.cuh is compiled as plain C++ over csrc/simt/simt.h, under
AddressSanitizer + UndefinedBehaviorSanitizer, and installed as the C++ op's CPU kernel for the
duration of each test (tests/simt_harness.py), so the calls below go through the public
`red_kernels.redistribute` exactly as the `cuda` backend's do on a GPU: op.py's normalisation, the
registered autograd formula, the same launch plans. The matrix is test_cuda.py's GPU matrix (every
case of cases.py, forward and gradients, the vector-tail and unaligned layouts, block and chunk
boundaries, unrequested gradients, padding, determinism, offsets past 2^31) plus shapes at the
kernels' internal boundaries. ThreadSanitizer runs a subset, and planted bugs prove each check bites.
"""

from __future__ import annotations

import sys

import pytest
import torch

import red_kernels
import simt_harness
import test_varlen
from cases import (DTYPES, Case, VarlenCase, assert_gradients_match, assert_matches, assert_padding_never_read,
                   assert_varlen_gradients_match, assert_varlen_matches, forward_cases, layout_inputs, make_inputs,
                   make_varlen_inputs, redistribute_varlen_op, upstream_gradients, varlen_cases)

sys.path.insert(0, str(simt_harness.ROOT / "benchmarks"))
import gpu_model  # noqa: E402

CASES = forward_cases()
RING_ROUND = {"f32": 32 * 4, "bf16": 32 * 8, "f16": 32 * 8}  # elements one warp's ring round moves


@pytest.fixture
def cuda_sim(poison_empty):
    """The harness as the CPU kernel (AddressSanitizer + UBSan build): backend="cpu" runs the CUDA source."""
    before = dict(simt_harness.CALLS)
    with simt_harness.as_cpu_kernel("asan"):
        yield "cpu"
    assert simt_harness.CALLS != before, "the harness never ran: the CPU kernel was not replaced"




def run(inputs: dict, backend: str):
    return red_kernels.redistribute(**inputs, backend=backend)


# ---------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_forward_matches_float64_spec(case: Case, cuda_sim: str) -> None:
    inputs = make_inputs(case)
    assert_matches(run(inputs, cuda_sim), inputs)


@pytest.mark.parametrize("layout", ["sliced", "offset"])
@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
@pytest.mark.parametrize("H", [5, 37, 1000, 2051])
def test_forward_vector_tail_and_unaligned(layout: str, dtype: str, H: int, cuda_sim: str) -> None:
    inputs = layout_inputs(layout, dtype, H, seed=H)
    if layout == "offset":
        assert inputs["hidden"].data_ptr() % 16 != 0
    assert_matches(run(inputs, cuda_sim), inputs)


def _ring_cases() -> list[Case]:
    """Aligned rows (the cp.async path) with H below, at and above one ring round and the ring's depth
    (4 rounds), so slots are reused: every dtype, every padding, both baselines across the set."""
    cases = []
    for dtype, rnd in RING_ROUND.items():
        for k, H in enumerate([rnd - 8, rnd, rnd + 8, 4 * rnd, 4 * rnd + 8, 8 * rnd + 16]):
            cases.append(Case(3, 31, H, dtype=dtype, padding=["both", "right", "left", "holey", "empty-row", "none"][k],
                              start="tensor", baseline=["prompt", "zero"][k % 2], bias=["float", "tensor"][k % 2],
                              seed=7 * H))
    return cases


RING_CASES = _ring_cases()


@pytest.mark.parametrize("case", RING_CASES, ids=[c.id for c in RING_CASES])
def test_ring_rounds_forward_and_gradients(case: Case, cuda_sim: str) -> None:
    inputs = make_inputs(case)
    assert inputs["hidden"].data_ptr() % 16 == 0 and (case.H * inputs["hidden"].element_size()) % 16 == 0
    assert_matches(run(inputs, cuda_sim), inputs)
    assert_gradients_match(case, cuda_sim, inputs=inputs)
    assert simt_harness.LAST_BACKWARD_PLAN["aligned"] == 1


@pytest.mark.parametrize("T", [1, 14, 15, 16, 29, 30, 31, 46, 300])
def test_block_boundaries(T: int, cuda_sim: str) -> None:
    """T around the forward's 15 positions per block (1, 2 and many blocks per row), every padding: the
    halo row, the one block per row that writes last_index and rewards, rows that are all padding."""
    for seed, padding in enumerate(["right", "left", "both", "holey", "empty-row"]):
        for baseline in ("prompt", "zero"):
            inputs = make_inputs(Case(5, T, 24, dtype="bf16", padding=padding, start="tensor", baseline=baseline,
                                      seed=100 * T + seed))
            assert_matches(run(inputs, cuda_sim), inputs)


def test_long_right_padding_scan(cuda_sim: str) -> None:
    """Rows far longer than one 256-position scan window, mostly right padding: the "is there a real
    token later" scan crosses many windows, and exactly one block per row writes last_index."""
    inputs = make_inputs(Case(2, 700, 8, dtype="f32", padding="right", start="tensor", seed=77))
    inputs["attention_mask"][0] = 0
    inputs["attention_mask"][0, :20] = 1  # 680 padding positions after the last real one
    inputs["attention_mask"][1] = 0  # all padding
    assert_matches(run(inputs, cuda_sim), inputs)


# ---------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_gradients_match_autograd_through_eager(case: Case, cuda_sim: str) -> None:
    assert_gradients_match(case, cuda_sim)


@pytest.mark.parametrize("layout", ["sliced", "offset"])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_gradients_vector_tail_and_unaligned(layout: str, dtype: str, cuda_sim: str) -> None:
    """H = 2051 spans a second column tile of the backward kernel, with a partial last pack."""
    inputs = layout_inputs(layout, dtype, 2051, seed=5)
    assert_gradients_match(Case(3, 37, 2051, dtype=dtype, seed=5), cuda_sim, inputs=inputs)
    assert simt_harness.LAST_BACKWARD_PLAN["column_tiles"] == (3 if dtype == "f32" else 2)


# (SMs, rows, H, dtype) -> chunks: at least 16 rows a chunk; chunks x column tiles aim at 4 blocks per SM.
CHUNKING = [(2, 15, 40, "bf16", 1), (2, 16, 40, "bf16", 1), (2, 17, 40, "bf16", 2), (2, 128, 40, "bf16", 8),
            (2, 129, 40, "bf16", 8), (2, 1000, 40, "bf16", 8), (2, 300, 2051, "f32", 3), (5, 300, 2051, "f32", 7),
            (132, 257, 40, "bf16", 17), (132, 8448, 24, "bf16", 528), (132, 9000, 24, "bf16", 500)]


@pytest.mark.parametrize("sms, rows, H, dtype, chunks", CHUNKING)
def test_gradients_across_chunks(sms: int, rows: int, H: int, dtype: str, chunks: int, poison_empty) -> None:
    """B*T around the backward's row chunks, for a few SM counts: the 16-row minimum, the block target,
    several column tiles. The forward is the eager reference here (only the backward is under test)."""
    case = Case(1, rows, H, dtype=dtype, padding="holey", start="tensor", bias="tensor", seed=rows)
    with simt_harness.as_cpu_kernel("asan", forward_by_reference=True, sm_count=sms):
        assert_gradients_match(case, "cpu")
    assert simt_harness.LAST_BACKWARD_PLAN["chunks"] == chunks
    # benchmarks/gpu_model.py restates the plan for its CUDA rows: it must agree with what runs.
    element = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    assert gpu_model.cuda_backward_blocks(1, rows, H, element, sms) == (chunks,
                                                                        simt_harness.LAST_BACKWARD_PLAN["column_tiles"])


def _backward_args(case: Case):
    inputs = make_inputs(case)
    B, T, H = inputs["hidden"].shape
    mask = (inputs["attention_mask"] != 0).to(torch.uint8)
    start = torch.full((B,), inputs["response_start"]) if isinstance(inputs["response_start"], int) else \
        inputs["response_start"]
    last_index = red_kernels.redistribute(**inputs, backend="eager").last_index
    upstream = upstream_gradients(B, T, case.seed)
    return (*upstream, inputs["hidden"], inputs["weight"], mask, start, last_index, False)


@pytest.mark.parametrize("output_mask", [[True, False, False], [False, True, False], [False, False, True],
                                         [True, False, True], [False, True, True]])
def test_backward_skips_unrequested(output_mask: list[bool]) -> None:
    """What is not requested comes back empty; what is requested is bitwise what a full call gives."""
    args = _backward_args(Case(4, 50, 300, dtype="bf16", padding="both", seed=41))
    full = simt_harness.backward(*args, [True, True, True])
    some = simt_harness.backward(*args, output_mask)
    for wanted, got, want in zip(output_mask, some, full):
        if wanted:
            assert torch.equal(got, want)
        else:
            assert got.numel() == 0


def test_padding_content_never_matters(cuda_sim: str) -> None:
    assert_padding_never_read(cuda_sim, "cpu", Case(3, 40, 64, padding="both", start="tensor", seed=9))


def test_grad_weight_is_deterministic() -> None:
    args = _backward_args(Case(2, 300, 264, dtype="bf16", padding="holey", seed=10))
    first = simt_harness.backward(*args, [True, True, True])
    second = simt_harness.backward(*args, [True, True, True])
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def _beyond_int32_inputs() -> dict:
    """A [2, 3, 16] bfloat16 view whose second row starts 2^31 + 16 elements in (4 GiB of address space,
    a few pages of data): every offset into row 1 needs 64 bits."""
    B, T, H = 2, 3, 16
    stride_b = 2**31 + 16
    storage = torch.empty(stride_b + T * H, dtype=torch.bfloat16)  # untouched pages stay unallocated
    hidden = torch.as_strided(storage, (B, T, H), (stride_b, H, 1))
    generator = torch.Generator().manual_seed(31)
    hidden.copy_(torch.randn(B, T, H, generator=generator))
    mask = torch.ones(B, T, dtype=torch.int64)
    mask[0, -1] = 0
    return dict(hidden=hidden, weight=torch.randn(H, generator=generator) / 4, bias=0.5, attention_mask=mask,
                response_start=torch.tensor([0, 1]), baseline="prompt")


def test_offsets_beyond_int32() -> None:
    inputs = _beyond_int32_inputs()
    with simt_harness.as_cpu_kernel("asan"):
        assert_matches(run(inputs, "cpu"), inputs)
        assert_gradients_match(Case(2, 3, 16, dtype="bf16", seed=31), "cpu", inputs=inputs)


# ---------------------------------------------------------------------------------------
# Packed sequences (redistribute_varlen): the same kernels' code over flat blocks of 15 tokens.


def run_varlen(inputs: dict, backend: str):
    return redistribute_varlen_op(inputs["hidden"], inputs["weight"], inputs["bias"], inputs, backend)


VARLEN_CASES = varlen_cases()
# Packs at the kernels' own boundaries: sequences ending at, before and after a 15-token block edge, one spanning
# several blocks, a block of only empty slots and padding, tail padding, the cp.async ring (aligned rows, H over
# several ring rounds) and its scalar twin (rows 2 bytes off 16-byte alignment).
VARLEN_BLOCK_CASES = [
    VarlenCase((14, 1, 15, 16, 0, 0, 29, 31, 1), 24, dtype="bf16", layout="1TH", in_slot=True, tail=7, carried=True,
               bias="tensor", seed=61),
    VarlenCase((15, 0, 0, 0, 45, 2), 40, dtype="f32", layout="T1H", tail=15, carried=True, baseline="zero", seed=62),
    VarlenCase((3, 70, 0, 12), 4 * RING_ROUND["f16"] + 8, dtype="f16", layout="1TH", in_slot=True, tail=2,
               start="int", seed=63),
    VarlenCase((5, 31, 17), RING_ROUND["f32"] + 8, dtype="f32", layout="1TH", carried=True, bias="none",
               baseline="zero", seed=64),
    VarlenCase(tuple(1 + (i * 5) % 3 for i in range(300)), 16, dtype="bf16", layout="1TH", in_slot=True, tail=3,
               carried=True, seed=65),  # many short sequences: every block crosses several slots
]
# test_varlen's edge packs, but for two: a pack without tokens never reaches a kernel (op.py answers it eagerly;
# direct calls are tested below), and N = 600 or 4096 take 6 s or 40 s in the emulator (VARLEN_BLOCK_CASES[4]
# has N = 300).
VARLEN_EDGE_CASES = [c for c in test_varlen.EDGE_CASES if 0 < sum(c.lengths) + c.tail and len(c.lengths) < 600] + \
    VARLEN_BLOCK_CASES


@pytest.mark.parametrize("case", VARLEN_CASES + VARLEN_EDGE_CASES, ids=[c.id for c in VARLEN_CASES + VARLEN_EDGE_CASES])
def test_varlen_forward_matches_float64_spec(case: VarlenCase, cuda_sim: str) -> None:
    inputs = make_varlen_inputs(case)
    assert_varlen_matches(run_varlen(inputs, cuda_sim), inputs)


def _unaligned_varlen_inputs(case: VarlenCase) -> dict:
    """The case's hidden moved 2 bytes off 16-byte alignment (the scalar variant of both kernels)."""
    inputs = make_varlen_inputs(case)
    hidden = inputs["hidden"].reshape(-1, case.H)
    flat = torch.empty(hidden.numel() + 8, dtype=hidden.dtype)
    moved = flat[1:1 + hidden.numel()].view(hidden.shape)
    moved.copy_(hidden)
    assert moved.data_ptr() % 16 != 0
    inputs["hidden"] = moved
    return inputs


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("case", VARLEN_BLOCK_CASES[:4], ids=[c.id for c in VARLEN_BLOCK_CASES[:4]])
def test_varlen_block_boundaries_forward_and_gradients(case: VarlenCase, aligned: bool, cuda_sim: str) -> None:
    inputs = make_varlen_inputs(case) if aligned else _unaligned_varlen_inputs(case)
    assert_varlen_matches(run_varlen(inputs, cuda_sim), inputs)
    assert_varlen_gradients_match(case, cuda_sim, inputs=inputs)
    element = inputs["hidden"].element_size()
    assert simt_harness.LAST_BACKWARD_PLAN["aligned"] == int(aligned and case.H * element % 16 == 0)


VARLEN_GRADIENT_CASES = VARLEN_CASES[::2] + test_varlen.EDGE_CASES[2:4] + test_varlen.EDGE_CASES[6:] + \
    VARLEN_BLOCK_CASES[4:]


@pytest.mark.parametrize("case", VARLEN_GRADIENT_CASES, ids=[c.id for c in VARLEN_GRADIENT_CASES])
def test_varlen_gradients_match_autograd_through_float64_reference(case: VarlenCase, cuda_sim: str) -> None:
    assert_varlen_gradients_match(case, cuda_sim)


@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
@pytest.mark.parametrize("packing", ["slots", "tight"])
def test_varlen_equals_padded_op_on_the_same_sequences(dtype: str, packing: str, cuda_sim: str) -> None:
    """test_varlen's check, with both the padded and the varlen op running the CUDA source."""
    test_varlen.check_varlen_equals_padded_op(cuda_sim, dtype, packing)


def test_varlen_padding_is_never_read(cuda_sim: str) -> None:
    test_varlen.test_varlen_padding_is_never_read(cuda_sim)


def test_varlen_op_without_tokens_or_sequences() -> None:
    """Direct op calls op.py routes to eager: T = 0 (every sequence empty) and N = 0."""
    weight = torch.randn(8)
    none = torch.zeros(0, dtype=torch.int64)
    scores, rewards, token_rewards, last_index = simt_harness.varlen_forward(
        torch.empty(0, 8), weight, None, torch.zeros(3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64),
        torch.zeros(2, dtype=torch.int64), None, False)
    assert scores.shape == (0,) and rewards.tolist() == [0.0, 0.0] and last_index.tolist() == [-1, -1]
    scores, rewards, token_rewards, last_index = simt_harness.varlen_forward(
        torch.randn(20, 8), weight, None, torch.zeros(1, dtype=torch.int64), none, none, None, False)
    assert (scores == 0).all() and (token_rewards == 0).all() and rewards.shape == (0,) and last_index.shape == (0,)


def test_varlen_grad_weight_is_deterministic() -> None:
    inputs = make_varlen_inputs(VarlenCase((40, 0, 77, 3, 120), 264, dtype="bf16", layout="1TH", in_slot=True,
                                           seed=66))
    hidden = inputs["hidden"].reshape(-1, 264)
    cu, lens = inputs["cu_seqlens"].long(), inputs["seq_lens"].long()
    start = inputs["response_start"].long()
    last_index = red_kernels.redistribute_varlen(hidden, inputs["weight"], cu_seqlens=cu, seq_lens=lens,
                                                 response_start=start, backend="eager").last_index
    T, N = hidden.shape[0], lens.shape[0]
    args = (torch.randn(T), torch.randn(N), torch.randn(T), hidden, inputs["weight"], cu, lens, start, last_index,
            False)
    first = simt_harness.varlen_backward(*args, [True, True, True], sm_count=3)
    assert simt_harness.LAST_BACKWARD_PLAN["chunks"] > 1
    second = simt_harness.varlen_backward(*args, [True, True, True], sm_count=3)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ---------------------------------------------------------------------------------------
# ThreadSanitizer: a data race on shared (or global) memory between two barriers fails.

TSAN_CASES = [Case(3, 40, 1024, dtype="f32", padding="none", start="tensor", seed=3),
              Case(2, 33, 2056, dtype="bf16", padding="both", start="tensor", bias="tensor", seed=4),
              Case(4, 63, 123, dtype="f16", padding="holey", start="int", baseline="zero", seed=5),
              Case(1, 257, 40, dtype="bf16", padding="empty-row", start="tensor", bias="tensor", seed=6)]


@pytest.mark.parametrize("case", TSAN_CASES, ids=[c.id for c in TSAN_CASES])
def test_thread_sanitizer(case: Case, poison_empty) -> None:
    inputs = make_inputs(case)
    with simt_harness.as_cpu_kernel("tsan"):
        assert_matches(run(inputs, "cpu"), inputs)
        assert_gradients_match(case, "cpu", inputs=inputs)


# ---------------------------------------------------------------------------------------
# Planted bugs (RED_MUTANT(n) in the kernels' header): each must be caught, and by the check meant for it.

MUTANTS = {
    1: ("asan", "a missing cp.async.wait_group", r"while the cp\.async into it .* is in flight"),
    2: ("asan", "a ring slot reused one round early", r"in flight"),
    3: ("asan", "the halo row shifted by one", r"token_rewards: \d+ elements out of tolerance"),
    # Whichever thread stops running last (one that exits while others wait in the barrier, or one that enters
    # it after the others have exited), the barrier check names the bug the same way.
    4: ("asan", "__syncthreads in a branch not every thread takes",
        r"wait in __syncthreads.*: a barrier or warp exchange that not every thread reaches"),
    5: ("asan", "a shuffle mask missing a lane", r"mask 0x7fffffff"),
    6: ("asan", "a backward chunk that skips its last row", r"grad_hidden: \d+ elements out of tolerance"),
    7: ("asan", "a 32-bit row offset", r"AddressSanitizer|scores: \d+ elements out of tolerance"),
    8: ("tsan", "no barrier between writing and reading chunk_scores", r"ThreadSanitizer: data race"),
}
MUTANT_CASES = [Case(3, 40, 1024, dtype="f32", padding="none", start="tensor", seed=3),
                Case(2, 31, 2056, dtype="bf16", padding="both", start="tensor", bias="tensor", seed=8)]


def _run_matrix_subset(variant: str, mutant: int) -> None:
    with simt_harness.as_cpu_kernel(variant, mutant):
        for case in MUTANT_CASES:
            inputs = make_inputs(case)
            assert_matches(run(inputs, "cpu"), inputs)
            assert_gradients_match(case, "cpu", inputs=inputs)
        inputs = _beyond_int32_inputs()
        assert_matches(run(inputs, "cpu"), inputs)


@pytest.mark.parametrize("mutant", sorted(MUTANTS), ids=[MUTANTS[m][1].replace(" ", "_") for m in sorted(MUTANTS)])
def test_planted_bug_is_caught(mutant: int, poison_empty) -> None:
    variant, what, message = MUTANTS[mutant]
    with pytest.raises((simt_harness.SimtError, AssertionError), match=message):
        _run_matrix_subset(variant, mutant)


VARLEN_MUTANTS = {
    9: ("asan", "an empty sequence's last_index and reward not written", r"rewards has non-finite values"),
    10: ("asan", "the backward's slot lookup off by one", r"grad_hidden: \d+ elements out of tolerance"),
}
VARLEN_MUTANT_CASES = [VARLEN_BLOCK_CASES[0]]


def _run_varlen_subset(variant: str, mutant: int | None) -> None:
    with simt_harness.as_cpu_kernel(variant, mutant):
        for case in VARLEN_MUTANT_CASES:
            inputs = make_varlen_inputs(case)
            assert_varlen_matches(run_varlen(inputs, "cpu"), inputs)
            assert_varlen_gradients_match(case, "cpu", inputs=inputs)


@pytest.mark.parametrize("mutant", sorted(VARLEN_MUTANTS),
                         ids=[VARLEN_MUTANTS[m][1].replace(" ", "_") for m in sorted(VARLEN_MUTANTS)])
def test_varlen_planted_bug_is_caught(mutant: int, poison_empty) -> None:
    variant, what, message = VARLEN_MUTANTS[mutant]
    with pytest.raises((simt_harness.SimtError, AssertionError), match=message):
        _run_varlen_subset(variant, mutant)


def test_varlen_unmutated_subset_passes_both_sanitizers(poison_empty) -> None:
    """The control for the varlen planted bugs, and the varlen kernels under ThreadSanitizer."""
    _run_varlen_subset("asan", None)
    _run_varlen_subset("tsan", None)


def test_unmutated_subset_passes_both_sanitizers(poison_empty) -> None:
    """The control for the planted bugs: the same subset passes without a mutation."""
    _run_matrix_subset("asan", None)
    with simt_harness.as_cpu_kernel("tsan"):
        case = MUTANT_CASES[0]
        inputs = make_inputs(case)
        assert_matches(run(inputs, "cpu"), inputs)


def test_mutants_are_absent_from_the_real_build() -> None:
    """RED_MUTANT(n) is false unless the harness defines RED_SIMT_MUTANT: the CUDA build never sees one."""
    header = (simt_harness.CSRC / "cuda" / "redistribute_kernels.cuh").read_text()
    assert "#if defined(RED_SIMT_MUTANT)" in header and "#define RED_MUTANT(n) false" in header
    assert "RED_SIMT_MUTANT" not in (simt_harness.CSRC / "cuda" / "redistribute.cu").read_text()
