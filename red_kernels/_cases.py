"""Cases for the op: random inputs with awkward shapes and masks, and the float64 check.

Shipped in the package so `python -m red_kernels.check` runs the test suite's own cases on a user's
GPU; tests/cases.py re-exports these names.

Every case draws fresh random inputs (never zeros). The expected values are the spec
evaluated in float64 on the same inputs (red_kernels.reference with compute_dtype=float64);
a kernel's error is bounded by what float32 accumulation can give, scaled by
sum_h |hidden * weight| at each position, so a missing or doubled term always fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools

import torch

from red_kernels.reference import redistribute_reference

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
SHAPES = [(1, 1, 1), (3, 1, 7), (4, 63, 123), (3, 17, 7), (2, 9, 4097), (5, 63, 1), (2, 40, 64)]
PADDINGS = ["none", "right", "left", "both", "holey", "empty-row"]
EPS32 = torch.finfo(torch.float32).eps
# float32 accumulation error bound, in units of eps * sum_h |x*w|: the kernels keep up to 64
# partial sums, so no float32 sum has more than ~H/16 sequential terms; this stays far below a
# single dropped term (sum/H on average) for every H we test.
ACCUMULATION_ULPS = 64


@dataclasses.dataclass
class Case:
    B: int
    T: int
    H: int
    dtype: str = "f32"
    padding: str = "right"
    start: str = "int"  # "int" | "tensor" (tensor includes values outside [0, T])
    baseline: str = "prompt"
    bias: str = "float"  # "none" | "float" | "tensor"
    layout: str = "contiguous"  # "contiguous" | "strided" (non-contiguous hidden, unit inner stride) | "transposed"
    seed: int = 0

    @property
    def id(self) -> str:
        return (f"B{self.B}-T{self.T}-H{self.H}-{self.dtype}-{self.padding}-start_{self.start}-{self.baseline}"
                f"-bias_{self.bias}-{self.layout}")


def forward_cases() -> list[Case]:
    """Every shape x dtype x padding; the other axes cycle so each value meets many shapes."""
    cycle = itertools.cycle(itertools.product(["int", "tensor"], ["prompt", "zero"], ["none", "float", "tensor"],
                                              ["contiguous", "strided", "transposed"]))
    cases = []
    for seed, (shape, dtype, padding) in enumerate(itertools.product(SHAPES, DTYPES, PADDINGS)):
        start, baseline, bias, layout = next(cycle)
        cases.append(Case(*shape, dtype=dtype, padding=padding, start=start, baseline=baseline, bias=bias,
                          layout=layout, seed=seed))
    return cases


def make_mask(B: int, T: int, padding: str, generator: torch.Generator) -> torch.Tensor:
    """An int64 [B, T] attention mask with random lengths; rows differ from one another."""
    mask = torch.zeros(B, T, dtype=torch.int64)
    for b in range(B):
        n = int(torch.randint(1, T + 1, (), generator=generator))  # real tokens in this row
        if padding == "none":
            mask[b] = 1
        elif padding == "right":
            mask[b, :n] = 1
        elif padding == "left":
            mask[b, T - n:] = 1
        elif padding == "both":
            lead = int(torch.randint(0, T - n + 1, (), generator=generator))
            mask[b, lead:lead + n] = 1
        elif padding == "holey":
            mask[b] = (torch.rand(T, generator=generator) < 0.6).long() * torch.randint(1, 4, (T,), generator=generator)
        elif padding == "empty-row":
            mask[b, :n] = 1
            if b % 2 == 1 or B == 1:
                mask[b] = 0
        else:
            raise ValueError(padding)
    return mask


def make_inputs(case: Case) -> dict:
    g = torch.Generator().manual_seed(1000 + case.seed)
    B, T, H = case.B, case.T, case.H
    dtype = DTYPES[case.dtype]
    full = torch.randn(B, T, H, generator=g)
    if case.layout == "strided":  # every other position of a longer sequence: stride(1) = 2H
        hidden = torch.randn(B, 2 * T, H, generator=g).to(dtype)[:, ::2, :]
    elif case.layout == "transposed":  # stored [T, B, H]: stride(0) = H, stride(1) = B*H
        hidden = full.transpose(0, 1).contiguous().to(dtype).transpose(0, 1)
    else:
        hidden = full.to(dtype)
    weight = torch.randn(H, generator=g) / H ** 0.5
    bias = {"none": None, "float": 0.25, "tensor": torch.randn(1, generator=g)}[case.bias]
    mask = make_mask(B, T, case.padding, g)
    if case.start == "int":
        start = int(torch.randint(0, T + 1, (), generator=g))
    else:
        start = torch.randint(0, T + 1, (B,), generator=g)
        start[0] = -3  # clamped to 0
        if B > 1:
            start[1] = T + 5  # clamped to T: no response tokens
    return dict(hidden=hidden, weight=weight, bias=bias, attention_mask=mask, response_start=start,
                baseline=case.baseline)


def layout_inputs(layout: str, dtype: str, H: int, seed: int) -> dict:
    """Hidden whose row starts are 16-byte aligned but H is not a whole number of 16-byte packs
    ("sliced": the vector path plus its scalar tail), or whose base is 2 bytes off ("offset": the
    scalar path for a shape that would otherwise be vectorised)."""
    inputs = make_inputs(Case(3, 37, H, dtype=dtype, padding="both", start="tensor", seed=seed))
    hidden = inputs["hidden"]
    B, T, _ = hidden.shape
    if layout == "sliced":
        wide = torch.randn(B, T, 64 * ((H + 63) // 64 + 1)).to(hidden.dtype)
        wide[..., :H] = hidden
        hidden = wide[..., :H]
    else:
        flat = torch.randn(hidden.numel() + 8).to(hidden.dtype)
        hidden = flat[1:1 + hidden.numel()].view(B, T, H)
        hidden.copy_(inputs["hidden"])
    inputs["hidden"] = hidden
    return inputs


def expected(inputs: dict) -> tuple[torch.Tensor, ...]:
    """The spec in float64, and each position's accumulation scale sum_h |x*w| + |bias|."""
    hidden, weight, bias = inputs["hidden"], inputs["weight"], inputs["bias"]
    B = hidden.shape[0]
    bias64 = None if bias is None else torch.as_tensor(bias, dtype=torch.float64).reshape(1)
    start = inputs["response_start"]
    start = start if isinstance(start, torch.Tensor) else torch.full((B,), start)
    outputs = redistribute_reference(hidden, weight.reshape(-1), bias64, inputs["attention_mask"], start,
                                     inputs["baseline"] == "zero", compute_dtype=torch.float64)
    scale = hidden.double().abs() @ weight.double().abs().reshape(-1)
    if bias64 is not None:
        scale = scale + bias64.abs()
    return (*outputs, scale)


def assert_matches(out, inputs: dict) -> None:
    """Kernel outputs versus the float64 spec, within float32 accumulation error."""
    scores, rewards, token_rewards, last_index, scale = expected(inputs)
    B, T = scores.shape
    assert out.scores.dtype == torch.float32 and out.scores.shape == (B, T)
    assert out.rewards.dtype == torch.float32 and out.rewards.shape == (B,)
    assert out.token_rewards.dtype == torch.float32 and out.token_rewards.shape == (B, T)
    assert out.last_index.dtype == torch.int64 and out.last_index.shape == (B,)
    for name, tensor in out._asdict().items():
        assert torch.isfinite(tensor.double()).all(), f"{name} has non-finite values (an unwritten element?)"

    tol = ACCUMULATION_ULPS * EPS32 * scale + 1e-30
    tol_prev = torch.nn.functional.pad(tol[:, :-1], (1, 0))
    torch.testing.assert_close(out.last_index, last_index, rtol=0, atol=0)
    assert_within("scores", out.scores, scores, tol)
    assert_within("token_rewards", out.token_rewards, token_rewards, tol + tol_prev)
    reward_tol = tol.gather(1, last_index.clamp(min=0).unsqueeze(1)).squeeze(1)
    assert_within("rewards", out.rewards, rewards, reward_tol)


_worst: list[float] | None = None  # set by track_worst_ratio


@contextlib.contextmanager
def track_worst_ratio():
    """Within the block, every assert_within records its largest error / tolerance; yields the list."""
    global _worst
    previous, _worst = _worst, []
    try:
        yield _worst
    finally:
        _worst = previous


def assert_within(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor) -> None:
    error = (actual.double() - expected).abs()
    if _worst is not None and error.numel():
        ratio = torch.where(error == 0, 0.0, error / tol)  # an exact 0 against a 0 bound is no error
        _worst.append(float(ratio.nan_to_num(nan=float("inf")).max()))
    bad = ~(error <= tol)  # NaN never passes
    if bad.any():
        index = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{name}: {int(bad.sum())} elements out of tolerance; first at {index}: "
                             f"got {actual[index].item()!r}, expected {expected[index].item()!r}, "
                             f"tolerance {tol[index].item():.3g}")


def to_device(x, device):
    """x on ``device`` with the same sizes and strides (a strided view stays a strided view)."""
    if not isinstance(x, torch.Tensor) or torch.device(device) == x.device:
        return x
    return torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=device).copy_(x)


def _start_tensor(inputs: dict) -> torch.Tensor:
    start = inputs["response_start"]
    return start if isinstance(start, torch.Tensor) else torch.full((inputs["hidden"].shape[0],), start)


def upstream_gradients(B: int, T: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Random gradients arriving at scores, rewards and token_rewards."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, generator=generator), torch.randn(B, generator=generator),
            torch.randn(B, T, generator=generator))


def weighted_loss(outputs, upstream) -> torch.Tensor:
    """sum(scores * g1) + sum(rewards * g2) + sum(token_rewards * g3): every float output gets a gradient."""
    total = 0
    for output, grad in zip(outputs[:3], upstream):
        total = total + (output * grad.to(output.device, output.dtype)).sum()
    return total


def reference_gradients(inputs: dict, upstream) -> tuple[torch.Tensor, ...]:
    """Autograd through the eager reference, in float64: grad of hidden, weight, bias (None without a bias tensor)."""
    hidden = inputs["hidden"].detach().double().requires_grad_()
    weight = inputs["weight"].detach().double().reshape(-1).requires_grad_()
    bias = inputs["bias"]
    bias = None if bias is None else torch.as_tensor(bias, dtype=torch.float64).reshape(1).requires_grad_()
    outputs = redistribute_reference(hidden, weight, bias, inputs["attention_mask"], _start_tensor(inputs),
                                     inputs["baseline"] == "zero", compute_dtype=torch.float64)
    leaves = [hidden, weight] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(weighted_loss(outputs, upstream), leaves)
    return grads if bias is not None else (*grads, None)


def output_rounding(dtype: torch.dtype) -> float:
    """Relative rounding of grad_hidden stored in the hidden dtype: round to nearest even, half an ulp, on every
    backend (the Triton backward rounds bf16 itself under the interpreter, whose own cast truncates)."""
    return {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]


def assert_gradients_match(case: Case, backend: str, device="cpu", inputs: dict | None = None) -> None:
    """The op's gradients on ``device`` versus autograd through the float64 reference on the CPU.

    |g[b,t]| is bounded by the upstream gradients that reach scores[b,t]; grad_hidden = g * w is
    off by float32 rounding of g plus the output rounding of its dtype; grad_weight and grad_bias
    are float32 sums bounded like the forward's.
    """
    inputs = make_inputs(case) if inputs is None else inputs
    upstream = upstream_gradients(case.B, case.T, case.seed)
    on_device = {name: to_device(value, device) for name, value in inputs.items()}
    hidden = on_device["hidden"].detach().requires_grad_()
    weight = on_device["weight"].detach().clone().requires_grad_()
    bias = on_device["bias"]
    if isinstance(bias, torch.Tensor):
        bias = bias.detach().clone().requires_grad_()
    out = redistribute_op(hidden, weight, bias, on_device, backend)
    weighted_loss(out, upstream).backward()
    want_hidden, want_weight, want_bias = reference_gradients(inputs, upstream)

    assert hidden.grad.dtype == hidden.dtype and hidden.grad.shape == hidden.shape
    assert weight.grad.dtype == weight.dtype
    valid = (inputs["attention_mask"] != 0).double()
    g_bound = valid * (upstream[0].abs() + upstream[1].abs()[:, None] + upstream[2].abs()
                       + torch.nn.functional.pad(upstream[2].abs()[:, 1:], (0, 1))).double()
    grad_hidden = hidden.grad.cpu()
    tol_hidden = (4 * EPS32 * g_bound[..., None] * inputs["weight"].double().abs()
                  + output_rounding(hidden.dtype) * want_hidden.abs()
                  + (2.0**-24 if hidden.dtype == torch.float16 else 0.0))  # float16's smallest subnormal
    assert_within("grad_hidden", grad_hidden, want_hidden, tol_hidden)
    assert (grad_hidden[valid == 0] == 0).all(), "gradient flowed into padding"

    x_abs = inputs["hidden"].double().abs()
    tol_weight = ACCUMULATION_ULPS * EPS32 * torch.einsum("bt,bth->h", g_bound, x_abs) + 1e-30
    assert_within("grad_weight", weight.grad.cpu(), want_weight, tol_weight)
    if isinstance(bias, torch.Tensor):
        tol_bias = ACCUMULATION_ULPS * EPS32 * g_bound.sum().reshape(1) + 1e-30
        assert_within("grad_bias", bias.grad.cpu().reshape(1), want_bias, tol_bias)


def redistribute_op(hidden, weight, bias, inputs: dict, backend: str):
    import red_kernels

    return red_kernels.redistribute(hidden, weight, bias, attention_mask=inputs["attention_mask"],
                                    response_start=inputs["response_start"], baseline=inputs["baseline"],
                                    backend=backend)


def assert_padding_never_read(backend: str, device="cpu", case: Case | None = None) -> None:
    """NaN in hidden at padding positions reaches no output and no gradient: padding is never read."""
    case = case or Case(3, 10, 16, padding="both", start="tensor", seed=9)
    inputs = {name: to_device(value, device) for name, value in make_inputs(case).items()}
    hidden = inputs["hidden"].clone()
    hidden[inputs["attention_mask"] == 0] = float("nan")
    hidden.requires_grad_()
    weight = inputs["weight"].requires_grad_()
    out = redistribute_op(hidden, weight, 0.5, inputs, backend)
    weighted_loss(out, upstream_gradients(case.B, case.T, 0)).backward()
    for tensor in (*out[:3], hidden.grad, weight.grad):
        assert torch.isfinite(tensor).all()


def op_names(backend: str) -> tuple[str, str]:
    """The registered forward and backward op names of a fused backend ("cpu" and "cuda" share one pair)."""
    return ("redistribute_triton", "redistribute_triton_backward") if backend == "triton" else \
        ("redistribute", "redistribute_backward")


def op_pair(backend: str):
    """The forward and backward ops of a fused backend, as torch.ops callables."""
    forward, backward = op_names(backend)
    return getattr(torch.ops.red_kernels, forward), getattr(torch.ops.red_kernels, backward)


# ---------------------------------------------------------------------------------------------
# Packed sequences (docs/spec.md section 5)

VARLEN_LAYOUTS = ["TH", "1TH", "T1H"]  # [T, H]; [1, T, H] (flash-attn / verl); [T, 1, H] (Megatron, sequence-first)


@dataclasses.dataclass
class VarlenCase:
    lengths: tuple  # slot lengths; 0 is an empty slot
    H: int
    dtype: str = "f32"
    layout: str = "TH"
    in_slot: bool = False  # seq_lens shorter than the slots (Megatron's cu_seqlens_padded)
    tail: int = 0  # padding tokens past cu_seqlens[-1]
    start: str = "tensor"  # "int" | "tensor" (tensor includes values outside [0, len])
    baseline: str = "prompt"
    bias: str = "float"
    carried: bool = False  # prev_scores given (some NaN)
    index_dtype: str = "int32"
    seed: int = 0

    @property
    def id(self) -> str:
        n = len(self.lengths)
        shape = "-".join(map(str, self.lengths)) if n <= 6 else f"N{n}"
        return (f"{shape}-H{self.H}-{self.dtype}-{self.layout}{'-inslot' if self.in_slot else ''}"
                f"{f'-tail{self.tail}' if self.tail else ''}-start_{self.start}-{self.baseline}-bias_{self.bias}"
                f"{'-carried' if self.carried else ''}-{self.index_dtype}")


def varlen_cases() -> list[VarlenCase]:
    """Awkward packs x dtypes; the other axes cycle so each value meets many packs."""
    packs = [((1,), 1), ((5,), 7), ((3, 0, 9, 1), 123), ((17, 4, 0, 0, 30), 64), ((2, 61), 4097),
             ((1,) * 40, 5), ((33, 1, 7), 136)]
    cycle = itertools.cycle(itertools.product(VARLEN_LAYOUTS, [False, True], [0, 3], ["int", "tensor"],
                                              ["prompt", "zero"], ["none", "float", "tensor"], [False, True],
                                              ["int32", "int64"]))
    cases = []
    for seed, ((lengths, H), dtype) in enumerate(itertools.product(packs, DTYPES)):
        layout, in_slot, tail, start, baseline, bias, carried, index_dtype = next(cycle)
        cases.append(VarlenCase(lengths, H, dtype=dtype, layout=layout, in_slot=in_slot, tail=tail, start=start,
                                baseline=baseline, bias=bias, carried=carried, index_dtype=index_dtype,
                                seed=500 + seed))
    return cases


def make_varlen_inputs(case: VarlenCase) -> dict:
    g = torch.Generator().manual_seed(2000 + case.seed)
    lengths = torch.tensor(case.lengths, dtype=torch.int64)
    N = len(case.lengths)
    cu = torch.zeros(N + 1, dtype=torch.int64)
    cu[1:] = lengths.cumsum(0)
    total = int(cu[-1]) + case.tail
    dtype = DTYPES[case.dtype]
    H = case.H
    if case.layout == "TH":  # rows 2H apart: a view that is not contiguous
        hidden = torch.randn(total, 2 * H, generator=g).to(dtype)[:, :H]
    elif case.layout == "1TH":
        hidden = torch.randn(1, total, H, generator=g).to(dtype)
    else:
        hidden = torch.randn(total, 1, H, generator=g).to(dtype)
    seq_lens = None
    if case.in_slot:
        seq_lens = (lengths.double() * torch.rand(N, generator=g)).round().long()
        seq_lens[lengths > 0] = torch.maximum(seq_lens[lengths > 0], torch.ones(1, dtype=torch.int64))
        if N > 1:
            seq_lens[-1] = 0 if lengths[-1] > 0 and N % 2 else seq_lens[-1]
        seq_lens = seq_lens.to(getattr(torch, case.index_dtype))
    real = lengths if seq_lens is None else seq_lens.long()
    if case.start == "int":
        start = int(torch.randint(0, int(real.max()) + 1 if N else 1, (), generator=g))
    else:
        start = (torch.rand(N, generator=g) * (real.double() + 1)).floor().long()
        if N > 0:
            start[0] = -3  # clamped to 0
        if N > 1:
            start[1] = int(real[1]) + 5  # clamped to the length: no response tokens
    prev_scores = None
    if case.carried:
        prev_scores = torch.randn(N, generator=g)
        prev_scores[1::2] = float("nan")
    weight = torch.randn(H, generator=g) / H ** 0.5
    bias = {"none": None, "float": 0.25, "tensor": torch.randn(1, generator=g)}[case.bias]
    return dict(hidden=hidden, weight=weight, bias=bias, cu_seqlens=cu.to(getattr(torch, case.index_dtype)),
                seq_lens=seq_lens, response_start=start, prev_scores=prev_scores, baseline=case.baseline)


def _varlen_reference_args(inputs: dict, dtype=torch.float64) -> tuple:
    from red_kernels.op import flatten_packed

    hidden = flatten_packed(inputs["hidden"])
    cu = inputs["cu_seqlens"].long()
    N = cu.shape[0] - 1
    lens = cu[1:] - cu[:-1] if inputs["seq_lens"] is None else inputs["seq_lens"].long()
    start = inputs["response_start"]
    start = start.long() if isinstance(start, torch.Tensor) else torch.full((N,), start)
    bias = inputs["bias"]
    bias = None if bias is None else torch.as_tensor(bias, dtype=dtype).reshape(1)
    prev = inputs["prev_scores"]
    return hidden, inputs["weight"].reshape(-1), bias, cu, lens, start, prev, inputs["baseline"] == "zero"


def varlen_expected(inputs: dict) -> tuple[torch.Tensor, ...]:
    """Section 5 in float64, and each token's accumulation scale sum_h |x*w| + |bias|."""
    from red_kernels.reference import redistribute_varlen_reference

    args = _varlen_reference_args(inputs)
    outputs = redistribute_varlen_reference(*args, compute_dtype=torch.float64)
    hidden, weight, bias = args[:3]
    scale = hidden.double().abs() @ weight.double().abs()
    if bias is not None:
        scale = scale + bias.abs()
    return (*outputs, scale)


def assert_varlen_matches(out, inputs: dict) -> None:
    """Varlen kernel outputs versus the float64 spec, within float32 accumulation error."""
    scores, rewards, token_rewards, last_index, scale = varlen_expected(inputs)
    (T,), (N,) = scores.shape, rewards.shape
    assert out.scores.dtype == torch.float32 and out.scores.shape == (T,)
    assert out.rewards.dtype == torch.float32 and out.rewards.shape == (N,)
    assert out.token_rewards.dtype == torch.float32 and out.token_rewards.shape == (T,)
    assert out.last_index.dtype == torch.int64 and out.last_index.shape == (N,)
    for name, tensor in out._asdict().items():
        assert torch.isfinite(tensor.double()).all(), f"{name} has non-finite values (an unwritten element?)"
    tol = ACCUMULATION_ULPS * EPS32 * scale + 1e-30
    # The previous token's bound, or the carried baseline's float32 rounding at a sequence's first token.
    tol_prev = torch.nn.functional.pad(tol[:-1], (1, 0))
    if inputs["prev_scores"] is not None:
        tol_prev = tol_prev + EPS32 * inputs["prev_scores"].double().abs().nan_to_num().max()
    torch.testing.assert_close(out.last_index.cpu(), last_index, rtol=0, atol=0)
    assert_within("scores", out.scores.cpu(), scores, tol)
    assert_within("token_rewards", out.token_rewards.cpu(), token_rewards, tol + tol_prev)
    reward_tol = tol[last_index.clamp(min=0)] if T else rewards.new_zeros(N)
    assert_within("rewards", out.rewards.cpu(), rewards, reward_tol + 1e-30)


def redistribute_varlen_op(hidden, weight, bias, inputs: dict, backend: str, prev_scores="inputs"):
    import red_kernels

    return red_kernels.redistribute_varlen(
        hidden, weight, bias, cu_seqlens=inputs["cu_seqlens"], response_start=inputs["response_start"],
        seq_lens=inputs["seq_lens"], prev_scores=inputs["prev_scores"] if prev_scores == "inputs" else prev_scores,
        baseline=inputs["baseline"], backend=backend)


def assert_varlen_gradients_match(case: VarlenCase, backend: str, device="cpu", inputs: dict | None = None) -> None:
    """The varlen op's gradients (hidden, weight, bias, prev_scores) on ``device`` versus autograd through the
    float64 reference, with the bounds of `assert_gradients_match`."""
    from red_kernels.reference import redistribute_varlen_reference

    inputs = make_varlen_inputs(case) if inputs is None else inputs
    hidden_in = inputs["hidden"]
    T, N = hidden_in.numel() // case.H, len(case.lengths)
    generator = torch.Generator().manual_seed(case.seed)
    upstream = (torch.randn(T, generator=generator), torch.randn(N, generator=generator),
                torch.randn(T, generator=generator))
    on_device = {name: to_device(value, device) for name, value in inputs.items()}
    hidden = on_device["hidden"].detach().requires_grad_()
    weight = on_device["weight"].detach().clone().requires_grad_()
    bias = on_device["bias"]
    if isinstance(bias, torch.Tensor):
        bias = bias.detach().clone().requires_grad_()
    prev = on_device["prev_scores"]
    if prev is not None:
        prev = prev.detach().clone().requires_grad_()
    out = redistribute_varlen_op(hidden, weight, bias, on_device, backend, prev_scores=prev)
    weighted_loss(out, upstream).backward()

    args = list(_varlen_reference_args(inputs))
    leaves = [args[0].detach().double().requires_grad_(), args[1].detach().double().requires_grad_()]
    args[0], args[1] = leaves
    if args[2] is not None:
        args[2] = args[2].detach().requires_grad_()
        leaves.append(args[2])
    if args[6] is not None:
        args[6] = args[6].detach().double().requires_grad_()
        leaves.append(args[6])
    want = torch.autograd.grad(weighted_loss(redistribute_varlen_reference(*args, compute_dtype=torch.float64),
                                             upstream), leaves)
    want_hidden, want_weight = want[0], want[1]

    from red_kernels.op import flatten_packed

    assert hidden.grad.dtype == hidden.dtype and hidden.grad.shape == hidden.shape
    grad_hidden = flatten_packed(hidden.grad).cpu()
    valid = _varlen_valid(inputs).double()
    g_bound = valid * (upstream[0].abs() + upstream[2].abs() + torch.nn.functional.pad(upstream[2].abs()[1:], (0, 1))
                       + _varlen_reward_bound(inputs, upstream[1])).double()
    tol_hidden = (4 * EPS32 * g_bound[:, None] * inputs["weight"].double().abs()
                  + output_rounding(hidden.dtype) * want_hidden.abs()
                  + (2.0**-24 if hidden.dtype == torch.float16 else 0.0))
    assert_within("grad_hidden", grad_hidden, want_hidden, tol_hidden)
    assert (grad_hidden[valid == 0] == 0).all(), "gradient flowed into padding"
    x_abs = args[0].detach().double().abs()
    tol_weight = ACCUMULATION_ULPS * EPS32 * (g_bound @ x_abs) + 1e-30
    assert_within("grad_weight", weight.grad.cpu().reshape(-1), want_weight, tol_weight)
    k = 3 if args[2] is not None else 2  # the reference's bias is a leaf whenever there is one, a float too
    if isinstance(bias, torch.Tensor):
        tol_bias = ACCUMULATION_ULPS * EPS32 * g_bound.sum().reshape(1) + 1e-30
        assert_within("grad_bias", bias.grad.cpu().reshape(1), want[2], tol_bias)
    if prev is not None:
        # -grad_token_rewards at a first token, exactly (no arithmetic but a negation).
        assert_within("grad_prev_scores", prev.grad.cpu(), want[k], torch.zeros(N, dtype=torch.float64))


def _varlen_valid(inputs: dict) -> torch.Tensor:
    """[T] bool: the real tokens of a varlen case."""
    from red_kernels.reference import packed_layout

    hidden, _, _, cu, lens, *_ = _varlen_reference_args(inputs)
    return packed_layout(cu, lens, hidden.shape[0])[2]


def _varlen_reward_bound(inputs: dict, grad_rewards: torch.Tensor) -> torch.Tensor:
    """[T]: |grad_rewards[i]| at sequence i's last real token, 0 elsewhere."""
    hidden, _, _, cu, lens, *_ = _varlen_reference_args(inputs)
    bound = torch.zeros(hidden.shape[0], dtype=torch.float64)
    keep = lens > 0
    bound[(cu[:-1] + lens - 1)[keep]] = grad_rewards.double().abs()[keep]
    return bound
