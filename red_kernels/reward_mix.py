"""The sparse/RED reward mix that red_ppo and the verl integration share: its settings' checks and the mix.

``mode`` picks the reward-model reward per token: ``sparse`` (the sequence score on the last token) or ``red``
(the dense token rewards, mixed with the sparse row as ``beta_c * red + (1 - beta_c) * sparse``); ``baseline``
is RED's baseline of the first response token (``prompt``: the prompt's score, ``zero``).
"""

from __future__ import annotations

import torch

MODES = ("red", "sparse")
BASELINES = ("prompt", "zero")


def check_reward_mix(settings: dict, prefix: str = "") -> None:
    """ValueError naming the first bad one of ``settings["mode"]``, ``["baseline"]`` and ``["beta_c"]`` (those
    present; other keys are not looked at) as ``prefix + key``, with what was expected and what came."""
    checks = {"mode": (lambda v: v in MODES, "'red' or 'sparse'"),
              "baseline": (lambda v: v in BASELINES, "'prompt' or 'zero'"),
              "beta_c": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0,
                         "a number in [0, 1]")}
    for key, (ok, expected) in checks.items():
        if key in settings and not ok(settings[key]):
            raise ValueError(f"{prefix}{key}: expected {expected}, got {settings[key]!r}")


def mix_rewards(red: torch.Tensor, sparse: torch.Tensor, beta_c: float) -> torch.Tensor:
    """``beta_c * red + (1 - beta_c) * sparse``; ``red`` itself when ``beta_c`` is 1 (no rounding)."""
    if beta_c == 1.0:
        return red
    return beta_c * red + (1.0 - beta_c) * sparse
