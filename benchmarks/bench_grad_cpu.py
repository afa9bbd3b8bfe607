"""Forward + backward of the fused op on the `cpu` backend against eager autograd.

At B=8, T=1024, H=2048 (bfloat16 and float32), side by side in one run: the loss
sum(scores * g1) + sum(rewards * g2) + sum(token_rewards * g3), differentiated in hidden,
weight and bias (a critic or reward-model training step's head), with
  cpu    red_kernels.redistribute(..., backend="cpu") and its fused backward kernel
  eager  the same through the eager reference and PyTorch autograd
Target (issue 4): bf16 at least 3x faster than eager. Usage: python benchmarks/bench_grad_cpu.py
"""

from __future__ import annotations

import torch

import red_kernels
from timing import cpu_benchmark_args, measure, record

TARGET_BF16 = 3.0


def bench(B: int, T: int, H: int, dtype: torch.dtype, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(H, generator=generator) / H**0.5).requires_grad_()
    bias = torch.zeros(1, requires_grad=True)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=generator)
    mask = (torch.arange(T) < lengths[:, None]).long()
    start = torch.full((B,), T // 4)
    g_scores, g_rewards, g_tokens = torch.randn(B, T), torch.randn(B), torch.randn(B, T)

    def step(backend: str):
        def run():
            out = red_kernels.redistribute(hidden, weight, bias, attention_mask=mask, response_start=start,
                                           backend=backend)
            loss = (out.scores * g_scores).sum() + (out.rewards * g_rewards).sum() + (out.token_rewards * g_tokens).sum()
            torch.autograd.grad(loss, (hidden, weight, bias))
        return run

    cpu = measure(step("cpu"), repeats)
    eager = measure(step("eager"), repeats)
    return {"B": B, "T": T, "H": H, "dtype": str(dtype).removeprefix("torch."), "cpu": cpu, "eager": eager,
            "speedup_vs_eager": eager["median_ms"] / cpu["median_ms"]}


def main() -> None:
    args = cpu_benchmark_args(__doc__, repeats=20)
    rows = [bench(*args.shape, dtype, args.repeats) for dtype in (torch.bfloat16, torch.float32)]
    print(f"redistribute forward+backward on CPU, B={args.shape[0]} T={args.shape[1]} H={args.shape[2]}, "
          f"{torch.get_num_threads()} threads; median ms [p20, p80]")
    for row in rows:
        cells = [f"{row[k]['median_ms']:8.2f} [{row[k]['p20_ms']:.2f}, {row[k]['p80_ms']:.2f}]" for k in ("cpu", "eager")]
        note = ""
        if row["dtype"] == "bfloat16":
            note = f"  target >= {TARGET_BF16}x: {'met' if row['speedup_vs_eager'] >= TARGET_BF16 else 'NOT met'}"
        print(f"{row['dtype']:9} cpu {cells[0]}  eager {cells[1]}  speedup {row['speedup_vs_eager']:.2f}x{note}")
    print(f"recorded in {record('bench_grad_cpu', rows, command='python benchmarks/bench_grad_cpu.py')}")


if __name__ == "__main__":
    main()
