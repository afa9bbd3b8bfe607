"""`ScoreHead`: a scalar-per-position head (a reward model's score, a critic's value)
computed by the fused op, with the state-dict keys of ``nn.Linear(hidden_size, 1)``."""

from __future__ import annotations

import math

import torch
from torch import nn

from red_kernels.op import RedistributeOutput, redistribute, redistribute_varlen


class ScoreHead(nn.Module):
    """``nn.Linear(hidden_size, 1)`` whose forward is `red_kernels.redistribute`.

    ``head.load_state_dict(reward_model.score.state_dict())`` converts an existing head
    (a head without bias loads with ``bias=False``).
    """

    def __init__(self, hidden_size: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size: expected a positive int, got {hidden_size}")
        factory = {"device": device, "dtype": dtype}
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(torch.empty((1, hidden_size), **factory))
        self.bias = nn.Parameter(torch.empty((1,), **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The initialisation of nn.Linear, so a fresh head behaves like one.
        bound = 1.0 / math.sqrt(self.hidden_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "ScoreHead":
        """A head holding a copy of ``linear``'s parameters (``out_features`` must be 1)."""
        if not isinstance(linear, nn.Linear) or linear.out_features != 1:
            raise ValueError(f"linear: expected nn.Linear(H, 1), got {linear!r}")
        head = cls(linear.in_features, bias=linear.bias is not None,
                   device=linear.weight.device, dtype=linear.weight.dtype)
        head.load_state_dict(linear.state_dict())
        return head

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        response_start: int | torch.Tensor,
        *,
        baseline: str = "prompt",
        backend: str = "auto",
    ) -> RedistributeOutput:
        return redistribute(hidden, self.weight, self.bias, attention_mask=attention_mask,
                            response_start=response_start, baseline=baseline, backend=backend)

    def forward_varlen(
        self,
        hidden: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor,
        response_start: int | torch.Tensor,
        seq_lens: torch.Tensor | None = None,
        prev_scores: torch.Tensor | None = None,
        baseline: str = "prompt",
        backend: str = "auto",
    ) -> RedistributeOutput:
        """The head on packed sequences (`red_kernels.redistribute_varlen`): ``[T, H]``, ``[1, T, H]`` or
        ``[T, 1, H]`` hidden with ``cu_seqlens``, as a critic with remove-padding or sequence packing holds them."""
        return redistribute_varlen(hidden, self.weight, self.bias, cu_seqlens=cu_seqlens,
                                   response_start=response_start, seq_lens=seq_lens, prev_scores=prev_scores,
                                   baseline=baseline, backend=backend)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, bias={self.bias is not None}"
