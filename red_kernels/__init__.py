"""red-kernels: fused reward redistribution (RED) for RLHF.

One pass over a reward model's final hidden states gives every prefix score, the
padding-aware last-token reward, and dense per-token rewards ``s_t - s_{t-1}``.
"""

from __future__ import annotations

import torch

from red_kernels import _library
from red_kernels.align import CrossTokenizerRewards, redistribute_across_tokenizers
from red_kernels.head import ScoreHead
from red_kernels.op import BACKENDS, RedistributeOutput, available_backends, redistribute, redistribute_varlen

__version__ = "0.1.0"

__all__ = ["BACKENDS", "RedistributeOutput", "ScoreHead", "available_backends", "build_info", "redistribute",
           "redistribute_varlen", "__version__"]
__all__ += ["CrossTokenizerRewards", "redistribute_across_tokenizers"]


def build_info() -> dict:
    """What this installation was built with (docs/spec.md section 2)."""
    flags = _library._C.build_flags() if _library._C is not None else {"cuda": False, "cuda_arch_list": []}
    return {
        "version": __version__,
        "torch": torch.__version__,
        "cuda": bool(flags["cuda"]) and _library.HAS_CUDA_KERNEL,
        "cuda_arch_list": list(flags["cuda_arch_list"]),
        "cpu_kernel": _library.HAS_CPU_KERNEL,
        "triton": _library.TRITON_VERSION,
    }
