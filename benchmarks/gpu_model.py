"""A static bandwidth model of the kernels on an H100: a MODEL, not a measurement.

For each benchmark shape of bench_op_gpu.py (B in {8, 32}, T in {1024, 4096}, H in {2048, 4096,
8192}, bf16 and fp32) it takes the launch the host function makes, compiles it for sm_90 as the JIT
specialises it (benchmarks/triton_lowering.py: no GPU needed), reads registers and shared memory from
the cubin, and derives:
  programs    blocks launched
  resident    blocks that fit on one SM at once: min over registers (65536 per SM), shared memory
              (228 KiB, 1 KiB reserved per block), threads (2048) and the 32-block limit
  waves       ceil(programs / (resident x 132))
  KiB/SM      bytes of hidden in flight per SM: resident blocks on an SM x bytes in flight per block
  frac        fraction of copy bandwidth by Little's law: in flight / (3.0 TB/s x 700 ns / 132 SMs),
              capped at 1, wave by wave (blocks of equal bytes; a last, partial wave runs at the fraction
              its own bytes in flight give)
  x floor     modelled time / (bytes moved / 3.0 TB/s) = 1 / frac, beside the target (1.25x)
Bytes in flight per block: pipelined loops keep NUM_STAGES - 1 tiles in flight; an unpipelined one, one tile.
What it leaves out: launch latency (~2-4 us per launch: the forward's second launch, the backward's
partial-sum reduction), L2 hits, DRAM page effects, the stores' own traffic (the backward moves
2 x hidden and is modelled on its reads). bench_op_gpu.py stays the measurement.

`model_row` takes plain numbers so rows for the CUDA kernels (registers and shared memory from
`cuobjdump -res-usage`) can be added beside the Triton ones.
The CUDA rows take registers and shared memory from the built extension's sm_90 code and the launch
shapes from the kernels' plans (restated in cuda_forward_blocks / cuda_backward_blocks, checked against
the harness in tests/test_simt.py).
Usage: python benchmarks/gpu_model.py [--no-record]
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch

from triton_lowering import H100, resident_blocks

FLOOR_TARGET = 1.25


def model_row(name: str, registers: int, shared_bytes: int, threads: int, blocks: int,
              bytes_in_flight_per_thread: float, gpu: dict = H100) -> dict:
    """The model for one kernel launch, from plain per-kernel numbers (Triton or CUDA alike)."""
    resident = resident_blocks(registers, shared_bytes, threads, gpu)
    sms = gpu["sms"]
    needed = gpu["copy_bytes_per_s"] * gpu["latency_s"] / sms  # Little's law, per SM
    per_block = threads * bytes_in_flight_per_thread
    if resident == 0:
        return {"kernel": name, "registers": registers, "shared_bytes": shared_bytes, "threads": threads,
                "programs": blocks, "resident_per_sm": 0, "waves": math.inf, "in_flight_per_sm_bytes": 0.0,
                "needed_per_sm_bytes": needed, "fraction_of_copy": 0.0, "x_floor": math.inf}
    # Equal blocks, wave by wave: a wave of n blocks keeps min(resident, ceil(n / SMs)) per SM in flight and
    # runs at that fraction of the bandwidth; the last, partial wave is slower only if it has too little in flight.
    waves = math.ceil(blocks / (resident * sms))
    time, left = 0.0, blocks
    for _ in range(waves):
        n = min(left, resident * sms)
        time += n / min(1.0, min(resident, n / sms) * per_block / needed)  # average blocks per SM
        left -= n
    fraction = blocks / time
    in_flight = min(resident, blocks / sms) * per_block
    return {"kernel": name, "registers": registers, "shared_bytes": shared_bytes, "threads": threads,
            "programs": blocks, "resident_per_sm": resident, "waves": waves,
            "in_flight_per_sm_bytes": in_flight, "needed_per_sm_bytes": needed, "fraction_of_copy": fraction,
            "x_floor": 1 / fraction if fraction else math.inf}


def _tile_bytes(launch, element_size: int) -> int:
    return launch.constexprs["BLOCK_T"] * launch.constexprs["BLOCK_H"] * element_size


def triton_rows(B: int, T: int, H: int, dtype: torch.dtype, cache: dict) -> list[dict]:
    from red_kernels import triton_kernels as tk
    from triton_lowering import compile_launch

    sms = H100["sms"]
    hidden = torch.empty(B * T * H, dtype=dtype).view(B, T, H)  # no pages touched: shapes and alignment only
    small = dict(weight=torch.empty(H), mask=torch.empty(B, T, dtype=torch.uint8),
                 start=torch.empty(B, dtype=torch.int64))
    outputs = (torch.empty(B, T), torch.empty(B), torch.empty(B, T), torch.empty(B, dtype=torch.int64))
    forward = tk.forward_launches(hidden, small["weight"], torch.empty(1), small["mask"], small["start"], False,
                                  outputs, sms)[0]
    partial = tk.backward_partial_rows(hidden, sms)
    backward = tk.backward_launches((torch.empty(B, T), torch.empty(B), torch.empty(B, T)), hidden, small["weight"],
                                    small["mask"], small["start"], small["start"], False, (True, True, True),
                                    (hidden, torch.empty(partial, H), torch.empty(partial)), sms)[0]
    rows = []
    for name, launch in (("triton forward", forward), ("triton backward", backward)):
        key = (launch.kernel.fn.__name__, dtype, tuple(sorted(launch.constexprs.items())), launch.num_warps)
        if key not in cache:
            cache[key] = compile_launch(launch)
        lowered = cache[key]
        threads = 32 * launch.num_warps
        stages = launch.constexprs["NUM_STAGES"]
        in_flight = _tile_bytes(launch, hidden.element_size()) * max(1, stages - 1) / threads
        blocks = math.prod(launch.grid)
        row = model_row(name, lowered.registers, lowered.shared_bytes, threads, blocks, in_flight)
        row.update(B=B, T=T, H=H, dtype=str(dtype).removeprefix("torch."), BLOCK_T=launch.constexprs["BLOCK_T"],
                   BLOCK_H=launch.constexprs["BLOCK_H"], num_stages=stages, spills=lowered.spills)
        rows.append(row)
    return rows


# The CUDA kernels' launch plans (csrc/cuda/redistribute_kernels.cuh: forward_plan, backward_plan), for
# the model only; tests/test_simt.py checks these against the plans the harness runs.
CUDA_THREADS, CUDA_ROWS_PER_BLOCK, CUDA_STAGES = 256, 15, 4
CUDA_BACKWARD_BLOCKS_PER_SM, CUDA_MIN_ROWS_PER_CHUNK = 4, 16


def cuda_forward_blocks(B: int, T: int) -> int:
    return B * math.ceil(T / CUDA_ROWS_PER_BLOCK)


def cuda_backward_blocks(B: int, T: int, H: int, element_size: int, sms: int) -> tuple[int, int]:
    """(chunks, column tiles) of the backward kernel with every gradient requested."""
    tiles = math.ceil(H / (CUDA_THREADS * (16 // element_size)))
    target_chunks = math.ceil(sms * CUDA_BACKWARD_BLOCKS_PER_SM / tiles)
    rows_per_chunk = max(CUDA_MIN_ROWS_PER_CHUNK, math.ceil(B * T / target_chunks))
    return math.ceil(B * T / rows_per_chunk), tiles


def cuda_resource_usage() -> dict[str, tuple[int, int]]:
    """{"forward bfloat16": (registers, shared bytes), ...} for the aligned sm_90 kernels of the built
    extension, from cuobjdump -res-usage; empty without a CUDA build or cuobjdump."""
    import re
    import subprocess

    import os

    import red_kernels
    from triton_lowering import _BIN

    tool = os.path.join(_BIN, "cuobjdump")  # the copy that ships with Triton
    if not red_kernels.build_info()["cuda"] or not os.access(tool, os.X_OK):
        return {}
    run = subprocess.run([tool, "-res-usage", "-arch", "sm_90", red_kernels._library._C.__file__], capture_output=True,
                         text=True)
    usage = {}
    for name, regs, shared in re.findall(r"Function (\S+):\s*REG:(\d+) STACK:\d+ SHARED:(\d+)", run.stdout):
        kind = "forward" if "forward_kernel" in name else "backward" if "backward_kernel" in name else None
        dtype = "bfloat16" if "BFloat16" in name else "float16" if "Half" in name else "float32"
        if kind and "Lb1E" in name:  # the aligned (cp.async) instantiation
            usage[f"{kind} {dtype}"] = (int(regs), int(shared))
    return usage


def cuda_rows(B: int, T: int, H: int, dtype: torch.dtype, usage: dict) -> list[dict]:
    """The CUDA kernels: kStages - 1 = 3 16-byte copies in flight per thread, in both kernels."""
    name = str(dtype).removeprefix("torch.")
    element = torch.empty(0, dtype=dtype).element_size()
    rows = []
    chunks, tiles = cuda_backward_blocks(B, T, H, element, H100["sms"])
    for kind, blocks in (("forward", cuda_forward_blocks(B, T)), ("backward", chunks * tiles)):
        if f"{kind} {name}" not in usage:
            continue
        registers, shared = usage[f"{kind} {name}"]
        row = model_row(f"cuda {kind}", registers, shared, CUDA_THREADS, blocks, (CUDA_STAGES - 1) * 16)
        row.update(B=B, T=T, H=H, dtype=name)
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"MODEL (not a measurement) on {H100['name']}: {H100['sms']} SMs, {H100['copy_bytes_per_s'] / 1e12:.1f} TB/s "
          f"copy, {H100['latency_s'] * 1e9:.0f} ns; needs {rows[0]['needed_per_sm_bytes'] / 1024:.1f} KiB in flight "
          f"per SM; target <= {FLOOR_TARGET}x floor")
    print(f"{'kernel':16} {'B':>3} {'T':>5} {'H':>5} {'dtype':8} {'tile':>7} {'regs':>4} {'smem KiB':>8} "
          f"{'programs':>8} {'res/SM':>6} {'waves':>5} {'KiB/SM':>7} {'frac':>5} {'x floor':>7}  target")
    for r in rows:
        tile = f"{r.get('BLOCK_T', '-')}x{r.get('BLOCK_H', '-')}"
        met = "met" if r["x_floor"] <= FLOOR_TARGET else "NOT met"
        print(f"{r['kernel']:16} {r.get('B', '-'):>3} {r.get('T', '-'):>5} {r.get('H', '-'):>5} {r.get('dtype', '-'):8} "
              f"{tile:>7} {r['registers']:4d} {r['shared_bytes'] / 1024:8.1f} {r['programs']:8d} "
              f"{r['resident_per_sm']:6d} {r['waves']:5} {r['in_flight_per_sm_bytes'] / 1024:7.1f} "
              f"{r['fraction_of_copy']:5.2f} {r['x_floor']:6.2f}x  {met}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to results/")
    args = parser.parse_args()
    cache, rows = {}, []
    usage = cuda_resource_usage()
    for B, T, H, dtype in itertools.product([8, 32], [1024, 4096], [2048, 4096, 8192],
                                            [torch.bfloat16, torch.float32]):
        rows.extend(triton_rows(B, T, H, dtype, cache))
        rows.extend(cuda_rows(B, T, H, dtype, usage))
    print_table(rows)
    if not args.no_record:
        import triton

        from timing import record

        path = record("gpu_model", rows, command="python benchmarks/gpu_model.py", model=H100,
                      triton=triton.__version__, note="static model, not a measurement")
        print(f"recorded in {path}")


if __name__ == "__main__":
    main()
