"""Timing and result records of the benchmark scripts that are not on pytest-benchmark
(bench_align_cpu.py; bench_op_gpu.py and gpu_model.py use only `record`). The CPU op benchmarks
(test_op_cpu.py, test_grad_cpu.py) use pytest-benchmark's timer and storage instead.

Medians with the 20th and 80th percentiles over repeated calls, and one JSON record per
run appended to benchmarks/results/<name>.json with the machine and library versions.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def measure(fn: Callable[[], object], repeats: int = 30, warmup: int = 3) -> dict:
    """Milliseconds per call of ``fn``: median, p20, p80."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - begin) * 1e3)
    quantiles = statistics.quantiles(samples, n=10)
    return {"median_ms": statistics.median(samples), "p20_ms": quantiles[1], "p80_ms": quantiles[7],
            "repeats": repeats}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import red_kernels

    extra = {}
    if red_kernels._library._C is not None:
        extra["cpu_isa"] = red_kernels._library._C.cpu_isa()
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "red_kernels": red_kernels.__version__, "python": platform.python_version(),
            **extra}


def record(name: str, rows: list[dict], **fields) -> Path:
    """Append one run to benchmarks/results/<name>.json (a list of runs)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    runs.append({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "machine": machine(), **fields, "rows": rows})
    path.write_text(json.dumps(runs, indent=1) + "\n")
    return path
