"""`redistribute_varlen` (docs/spec.md section 5) on every backend of this process: the float64 matrix, equality
with the padded op on the same sequences, edge packs, padding never read, gradients, registration, errors."""

from __future__ import annotations

import pytest
import torch

import red_kernels
from cases import (EPS32, Case, VarlenCase, assert_varlen_gradients_match, assert_varlen_matches, make_inputs,
                   make_varlen_inputs, redistribute_varlen_op, to_device, varlen_cases)
from conftest import TRITON_INTERPRET, cpu_backends, cpu_isas, fused_cpu_backends
from red_kernels.reference import redistribute_varlen_reference

BACKENDS = cpu_backends(varlen=True)
FUSED = fused_cpu_backends(varlen=True)
CASES = varlen_cases()


def run(inputs: dict, backend: str):
    return redistribute_varlen_op(inputs["hidden"], inputs["weight"], inputs["bias"], inputs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_varlen_matches_float64_spec(case: VarlenCase, backend: str, poison_empty) -> None:
    inputs = make_varlen_inputs(case)
    assert_varlen_matches(run(inputs, backend), inputs)


EDGE_CASES = [
    VarlenCase((0,), 8, seed=1),  # one empty sequence
    VarlenCase((0, 0, 0), 8, tail=2, seed=2),  # only empty sequences, and padding
    VarlenCase((1,), 3, start="int", seed=3),  # N = 1, one token
    VarlenCase((70,), 40, dtype="bf16", layout="1TH", seed=4),  # N = 1, several blocks
    VarlenCase(tuple((i * 7) % 5 for i in range(4096)), 8, dtype="bf16", layout="1TH", seed=5),  # N = 4096
    VarlenCase(tuple(1 + (i * 3) % 4 for i in range(600)), 16, in_slot=True, tail=5, carried=True,
               baseline="zero", seed=6),
    VarlenCase((9, 0, 4), 24, dtype="f16", layout="T1H", in_slot=True, carried=True, start="int", seed=7),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", EDGE_CASES, ids=[c.id for c in EDGE_CASES])
def test_varlen_edge_packs(case: VarlenCase, backend: str, poison_empty) -> None:
    inputs = make_varlen_inputs(case)
    assert_varlen_matches(run(inputs, backend), inputs)


def _ulp_close(name: str, actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor) -> None:
    """|actual - expected| <= one float32 ulp of ``scale`` (the magnitudes the value is made of)."""
    bound = EPS32 * scale + torch.finfo(torch.float32).tiny
    bad = ~((actual.double() - expected.double()).abs() <= bound)
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} elements differ by more than 1 ulp, first at "
                           f"{int(bad.nonzero()[0])}: {actual.flatten()[bad.flatten()][0].item()!r} vs "
                           f"{expected.flatten()[bad.flatten()][0].item()!r}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
@pytest.mark.parametrize("packing", ["slots", "tight"])
def test_varlen_equals_padded_op_on_the_same_sequences(backend: str, dtype: str, packing: str, poison_empty) -> None:
    check_varlen_equals_padded_op(backend, dtype, packing)


def check_varlen_equals_padded_op(backend: str, dtype: str, packing: str, device="cpu") -> None:
    """A right-padded batch packed two ways: its rows as slots with in-slot padding (seq_lens, no copy), and its
    real tokens packed tight; every output equals the padded op's to 1 ulp. (tests/test_cuda.py: on a GPU.)"""
    case = Case(5, 23, 67, dtype=dtype, padding="empty-row", start="tensor", baseline="zero", bias="tensor", seed=3)
    inputs = make_inputs(case)
    on_device = {name: to_device(value, device) for name, value in inputs.items()}
    hidden, mask = on_device["hidden"].contiguous(), inputs["attention_mask"]
    padded = red_kernels.redistribute(hidden, on_device["weight"], on_device["bias"],
                                      attention_mask=on_device["attention_mask"],
                                      response_start=on_device["response_start"], baseline=case.baseline,
                                      backend=backend)
    padded = type(padded)(*(t.cpu() for t in padded))
    B, T, H = hidden.shape
    lens = mask.sum(1)
    if packing == "slots":
        packed = hidden.view(B * T, H)
        cu = torch.arange(0, B * T + 1, T, dtype=torch.int32)
        seq_lens = lens
        where = torch.arange(B * T).view(B, T)
    else:
        packed = hidden[on_device["attention_mask"] != 0]
        cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0))
        seq_lens = None
        where = torch.full((B, T), -1)
        where[mask != 0] = torch.arange(int(lens.sum()))
    out = red_kernels.redistribute_varlen(packed, on_device["weight"], on_device["bias"], cu_seqlens=cu.to(device),
                                          response_start=on_device["response_start"],
                                          seq_lens=to_device(seq_lens, device), baseline=case.baseline,
                                          backend=backend)
    assert all(t.device == packed.device for t in out)
    out = type(out)(*(t.cpu() for t in out))
    real = mask != 0
    score_scale = padded.scores.abs()
    if backend == "eager":  # the varlen reference sums each token pairwise (packing-invariant), the padded one by BLAS
        score_scale = score_scale + (hidden.float() * inputs["weight"].float()).abs().sum(-1)
    _ulp_close("scores", out.scores[where[real]], padded.scores[real], score_scale[real])
    previous = torch.nn.functional.pad(score_scale[:, :-1], (1, 0))
    _ulp_close("token_rewards", out.token_rewards[where[real]], padded.token_rewards[real],
               (score_scale + previous)[real])
    reward_scale = padded.rewards.abs()
    if backend == "eager":
        reward_scale = score_scale.gather(1, padded.last_index.clamp(min=0)[:, None])[:, 0]
    _ulp_close("rewards", out.rewards, padded.rewards, reward_scale)
    expected_last = torch.where(padded.last_index >= 0, where.gather(1, padded.last_index.clamp(min=0)[:, None])[:, 0],
                                -1)
    assert torch.equal(out.last_index, expected_last)
    if packing == "slots":  # the padding inside slots is zero, as the padded op's
        assert (out.scores.view(B, T)[~real] == 0).all() and (out.token_rewards.view(B, T)[~real] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_padding_is_never_read(backend: str) -> None:
    """NaN in hidden at in-slot and tail padding reaches no output and no gradient."""
    case = VarlenCase((6, 0, 9, 4), 16, in_slot=True, tail=4, carried=True, seed=11)
    inputs = make_varlen_inputs(case)
    hidden = inputs["hidden"].clone()
    valid = torch.zeros(hidden.shape[0], dtype=torch.bool)
    cu, lens = inputs["cu_seqlens"].long(), inputs["seq_lens"].long()
    for i in range(len(case.lengths)):
        valid[int(cu[i]):int(cu[i]) + int(lens[i])] = True
    assert (~valid).sum() >= 6
    hidden[~valid] = float("nan")
    hidden.requires_grad_()
    weight = inputs["weight"].clone().requires_grad_()
    out = redistribute_varlen_op(hidden, weight, 0.5, inputs, backend)
    (out.scores.sum() + out.rewards.sum() + 2 * out.token_rewards.sum()).backward()
    for tensor in (*out[:3], hidden.grad, weight.grad):
        assert torch.isfinite(tensor).all()
    assert (hidden.grad[~valid] == 0).all()


GRADIENT_CASES = CASES[::2] + EDGE_CASES[2:4] + EDGE_CASES[5:]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", GRADIENT_CASES, ids=[c.id for c in GRADIENT_CASES])
def test_varlen_gradients_match_autograd_through_float64_reference(case: VarlenCase, backend: str,
                                                                   poison_empty) -> None:
    assert_varlen_gradients_match(case, backend)


@pytest.mark.skipif(TRITON_INTERPRET, reason="the eager reference is checked in the normal process")
@pytest.mark.parametrize("baseline", ["prompt", "zero"])
def test_gradcheck_varlen_reference_float64(baseline: str) -> None:
    inputs = make_varlen_inputs(VarlenCase((3, 0, 5, 2), 4, in_slot=True, tail=2, carried=True, baseline=baseline,
                                           seed=21))
    cu, lens = inputs["cu_seqlens"].long(), inputs["seq_lens"].long()
    start = inputs["response_start"]
    hidden = inputs["hidden"].reshape(-1, 4).double().requires_grad_()
    weight = inputs["weight"].double().requires_grad_()
    bias = torch.randn(1, dtype=torch.float64, requires_grad=True)
    prev = torch.randn(4, dtype=torch.float64)
    prev[1] = float("nan")
    prev.requires_grad_()

    def float_outputs(hidden, weight, bias, prev):
        return redistribute_varlen_reference(hidden, weight, bias, cu, lens, start, prev, baseline == "zero",
                                             compute_dtype=torch.float64)[:3]

    # NaN is no value to perturb: gradcheck the finite entries through a mask.
    finite = ~torch.isnan(prev)

    def with_finite(hidden, weight, bias, prev_finite):
        full = torch.full((4,), float("nan"), dtype=torch.float64).masked_scatter(finite, prev_finite)
        return float_outputs(hidden, weight, bias, full)

    assert torch.autograd.gradcheck(with_finite, (hidden, weight, bias, prev.detach()[finite].requires_grad_()))


def test_carried_baseline_is_the_first_tokens_previous_score() -> None:
    """Splitting a sequence in two and carrying the first part's last score gives the unsplit token rewards."""
    inputs = make_varlen_inputs(VarlenCase((19,), 12, start="int", seed=31))
    hidden, weight = inputs["hidden"], inputs["weight"]
    whole = red_kernels.redistribute_varlen(hidden, weight, 0.1, cu_seqlens=torch.tensor([0, 19]), response_start=4,
                                            backend="eager")
    for cut in (2, 4, 5, 11):
        for baseline in ("prompt", "zero"):
            ref = red_kernels.redistribute_varlen(hidden, weight, 0.1, cu_seqlens=torch.tensor([0, 19]),
                                                  response_start=4, baseline=baseline, backend="eager")
            carried = ref.scores[cut - 1].reshape(1)
            if baseline == "zero" and cut - 1 < 4:
                carried = torch.full((1,), float("nan"))
            for backend in BACKENDS:
                second = red_kernels.redistribute_varlen(hidden[cut:], weight, 0.1, cu_seqlens=torch.tensor([0, 19 - cut]),
                                                         response_start=torch.tensor([4 - cut]), prev_scores=carried,
                                                         baseline=baseline, backend=backend)
                torch.testing.assert_close(second.token_rewards, ref.token_rewards[cut:], rtol=0, atol=1e-5)
    assert whole.scores.shape == (19,)


@pytest.mark.parametrize("backend", FUSED)
def test_varlen_opcheck(backend: str) -> None:
    from red_kernels.op import flatten_packed

    inputs = make_varlen_inputs(VarlenCase((5, 0, 7), 24, in_slot=True, tail=2, carried=True, seed=41))
    hidden = flatten_packed(inputs["hidden"]).detach().requires_grad_()
    weight = inputs["weight"].clone().requires_grad_()
    bias = torch.tensor([0.3], requires_grad=True)
    cu = inputs["cu_seqlens"].long()
    lens = inputs["seq_lens"].long()
    start = inputs["response_start"].long()
    prev = inputs["prev_scores"].clone().requires_grad_()
    forward = (torch.ops.red_kernels.redistribute_varlen_triton if backend == "triton" else
               torch.ops.red_kernels.redistribute_varlen)
    torch.library.opcheck(forward, (hidden, weight, bias, cu, lens, start, prev, False))
    torch.library.opcheck(forward, (hidden.detach(), weight.detach(), None, cu, lens, start, None, True))


@pytest.mark.parametrize("backend", FUSED)
def test_varlen_meta_tensors(backend: str) -> None:
    hidden = torch.empty(10, 8, device="meta")
    forward = (torch.ops.red_kernels.redistribute_varlen_triton if backend == "triton" else
               torch.ops.red_kernels.redistribute_varlen)
    cu = torch.tensor([0, 4, 9], device="meta")
    lens = torch.tensor([4, 5], device="meta")
    scores, rewards, token_rewards, last_index = forward(hidden, torch.empty(8, device="meta"), None, cu, lens,
                                                         lens, None, False)
    assert scores.shape == (10,) and token_rewards.shape == (10,) and rewards.shape == (2,)
    assert last_index.dtype == torch.int64 and last_index.shape == (2,)


BAD = [
    (dict(cu_seqlens=torch.tensor([1, 4])), ValueError, "cu_seqlens: expected the first offset to be 0"),
    (dict(cu_seqlens=torch.tensor([0, 5, 3])), ValueError, "cu_seqlens: expected non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0, 4, 11])), ValueError, "passes the end"),
    (dict(cu_seqlens=torch.tensor([0.0, 4.0])), TypeError, "cu_seqlens: expected dtype int32 or int64"),
    (dict(cu_seqlens=torch.tensor([[0, 4]])), ValueError, "cu_seqlens: expected shape"),
    (dict(cu_seqlens=torch.zeros(0, dtype=torch.int64)), ValueError, "at least one"),
    (dict(cu_seqlens=[0, 4]), TypeError, "cu_seqlens: expected an int32 or int64 tensor"),
    (dict(seq_lens=torch.tensor([5, 2])), ValueError, "seq_lens: expected 0 <= seq_lens[i]"),
    (dict(seq_lens=torch.tensor([-1, 2])), ValueError, "seq_lens: expected 0 <= seq_lens[i]"),
    (dict(seq_lens=torch.tensor([1, 2, 3])), ValueError, "seq_lens: expected shape [2]"),
    (dict(response_start=-1), ValueError, "response_start: expected an int >= 0"),
    (dict(response_start=torch.tensor([1, 2, 3])), ValueError, "response_start: expected shape [2]"),
    (dict(response_start=torch.tensor([1.0, 2.0])), TypeError, "response_start: expected an integer tensor"),
    (dict(prev_scores=torch.tensor([1, 2])), TypeError, "prev_scores: expected None or a floating-point"),
    (dict(prev_scores=torch.zeros(3)), ValueError, "prev_scores: expected shape [2]"),
    (dict(hidden=torch.randn(2, 5, 8)), ValueError, "hidden: expected packed tokens"),
    (dict(hidden=torch.randn(10)), ValueError, "hidden: expected packed tokens"),
    (dict(hidden=torch.randn(10, 8).long()), TypeError, "hidden: expected dtype"),
    (dict(weight=torch.randn(7)), ValueError, "weight: expected shape [8]"),
    (dict(baseline="none"), ValueError, "baseline: expected one of"),
    (dict(backend="gpu"), ValueError, "backend: expected 'auto'"),
]


@pytest.mark.skipif(TRITON_INTERPRET, reason="input checks run before any backend; checked in the normal process")
@pytest.mark.parametrize("change,error,message", BAD, ids=[b[2][:40] for b in BAD])
def test_varlen_bad_input_raises_naming_the_argument(change: dict, error: type, message: str) -> None:
    args = dict(hidden=torch.randn(10, 8), weight=torch.randn(8), cu_seqlens=torch.tensor([0, 4, 9]),
                response_start=1)
    args.update(change)
    hidden, weight = args.pop("hidden"), args.pop("weight")
    with pytest.raises(error) as info:
        red_kernels.redistribute_varlen(hidden, weight, **args)
    assert message in str(info.value), str(info.value)


@pytest.mark.parametrize("backend", FUSED)
def test_varlen_score_head(backend: str) -> None:
    """ScoreHead.forward_varlen is the varlen op with the head's parameters (a critic on packed inputs)."""
    head = red_kernels.ScoreHead(12)
    hidden = torch.randn(1, 9, 12)
    cu = torch.tensor([0, 4, 9])
    out = head.forward_varlen(hidden, cu_seqlens=cu, response_start=1, backend=backend)
    want = red_kernels.redistribute_varlen(hidden, head.weight, head.bias, cu_seqlens=cu, response_start=1,
                                           backend="eager")
    torch.testing.assert_close(out.scores, want.scores, rtol=1e-5, atol=1e-6)
    out.token_rewards.sum().backward()
    assert head.weight.grad is not None and head.bias.grad is not None


ISA_CASES = [
    VarlenCase((61, 0, 3, 40), 4097, dtype="f32", tail=3, carried=True, seed=51),  # SIMD body and tail
    VarlenCase((61, 0, 3, 40), 4097, dtype="bf16", in_slot=True, tail=3, carried=True, seed=55),
    VarlenCase((9, 33, 1, 60), 1031, dtype="bf16", layout="1TH", carried=True, baseline="zero", seed=52),
    VarlenCase((17, 0, 25), 33, dtype="f16", layout="T1H", in_slot=True, tail=2, start="int", seed=53),
    VarlenCase((12, 7, 30), 16, dtype="bf16", carried=True, seed=54),
]


@pytest.mark.skipif(TRITON_INTERPRET, reason="C++ kernel: normal process")
@pytest.mark.parametrize("pinned_isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("threads", [1, 3])
def test_varlen_cpu_kernel_every_isa_and_chunking(pinned_isa: str, threads: int, poison_empty) -> None:
    """Each SIMD path of the C++ kernels on packed input, forward and backward, with thread counts that split the
    tokens mid-sequence (a chunk's first token reward needs the halo row, its walk starts by slot_of)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for case in ISA_CASES:
            inputs = make_varlen_inputs(case)
            assert_varlen_matches(run(inputs, "cpu"), inputs)
            assert_varlen_gradients_match(case, "cpu", inputs=inputs)
    finally:
        torch.set_num_threads(before)
