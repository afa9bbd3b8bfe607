"""`python -m red_kernels.check`: the one command a GPU user runs, exercised here on the CPU backends
(and the Triton interpreter) in its quick mode; it must fail loudly on a wrong kernel."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

import red_kernels


def _run_check(interpret: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1" if interpret else "0"}
    return subprocess.run([sys.executable, "-m", "red_kernels.check", "--quick", "--devices", "cpu",
                           "--bench-seconds", "0.5"], env=env, capture_output=True, text=True, timeout=600)


def test_check_passes_on_cpu_backends() -> None:
    result = _run_check(interpret=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout
    packed = red_kernels.available_backends("cpu", varlen=True)
    for backend in red_kernels.available_backends("cpu"):
        line = next(line for line in result.stdout.splitlines() if f" {backend} " in line)
        assert "28/28" in line, line
        assert (" 14/14 " in line) == (backend in packed), line  # every 3rd of the 21 packs, forward + backward


def test_check_passes_under_the_interpreter() -> None:
    """In a process of its own with TRITON_INTERPRET=1. Named so that `make test-triton` (-k triton) does
    not collect it a second time."""
    result = _run_check(interpret=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " triton " in result.stdout


def test_check_fails_on_a_wrong_kernel(monkeypatch, capsys) -> None:
    """A forward that is off by a hair in one position, and a backward that drops grad_weight, both fail."""
    from red_kernels import _cases, check

    real = _cases.redistribute_op

    def slightly_wrong(hidden, weight, bias, inputs, backend):
        out = real(hidden, weight, bias, inputs, backend)
        scores = out.scores.clone()
        scores.view(-1)[-1] += 1e-3 * (1 + scores.view(-1)[-1].abs())
        return out._replace(scores=scores)

    monkeypatch.setattr(_cases, "redistribute_op", slightly_wrong)
    assert check.main(["--quick", "--devices", "cpu", "--bench-seconds", "0.1"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "forward" in out
    monkeypatch.setattr(_cases, "redistribute_op", real)
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: None)  # no gradient reaches the leaves
    assert check.main(["--quick", "--devices", "cpu", "--bench-seconds", "0.1"]) == 1
    assert "backward" in capsys.readouterr().out


def test_check_fails_on_a_wrong_varlen_kernel(monkeypatch, capsys) -> None:
    """The packed op's cases are checked too: a token reward off by a hair fails them alone."""
    from red_kernels import _cases, check

    real = _cases.redistribute_varlen_op

    def slightly_wrong(hidden, weight, bias, inputs, backend, prev_scores="inputs"):
        out = real(hidden, weight, bias, inputs, backend, prev_scores)
        token_rewards = out.token_rewards.clone()
        token_rewards[0] += 1e-3 * (1 + token_rewards[0].abs())
        return out._replace(token_rewards=token_rewards)

    monkeypatch.setattr(_cases, "redistribute_varlen_op", slightly_wrong)
    assert check.main(["--quick", "--devices", "cpu", "--bench-seconds", "0.1"]) == 1
    failed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert failed and all("varlen forward" in line or "varlen backward" in line for line in failed), failed
