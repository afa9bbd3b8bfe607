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


def output_rounding(dtype: torch.dtype, backend: str, device) -> float:
    """Relative rounding of grad_hidden stored in the hidden dtype. The Triton interpreter (Triton
    on CPU tensors) casts float32 -> bfloat16 by truncation, one ulp (2^-7 relative); GPUs and the
    C++ kernel round to nearest even, half an ulp (2^-8)."""
    if dtype == torch.bfloat16:
        return 2.0**-7 if backend == "triton" and torch.device(device).type == "cpu" else 2.0**-8
    return {torch.float32: 0.0, torch.float16: 2.0**-11}[dtype]


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
                  + output_rounding(hidden.dtype, backend, device) * want_hidden.abs()
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
