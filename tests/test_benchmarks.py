"""The benchmark suites' own checks and the report's ratios (benchmarks/providers.py, benchmarks/report.py).

The suites themselves run in quick mode under `make test-bench`; these tests show that the checks they
run before timing can fail, and that the report divides the right medians.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import providers  # noqa: E402
import report  # noqa: E402

SHAPE = (2, 24, 40)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_compile_provider_matches_the_spec_and_a_wrong_output_fails(dtype):
    inputs = providers.make_inputs(*SHAPE, providers.DTYPES[dtype], seed=3)
    with torch.inference_mode():
        out = providers.forward_fn("compile", inputs)()
    providers.check_forward("compile", out, inputs)
    token_rewards = out.token_rewards.clone()
    token_rewards[1, 20] += 1e-3 * token_rewards.abs().max()
    with pytest.raises(AssertionError, match="token_rewards"):
        providers.check_forward("compile", out._replace(token_rewards=token_rewards), inputs)


def test_read_floor_check_fails_on_a_wrong_sum():
    inputs = providers.make_inputs(*SHAPE, torch.float32, seed=4)
    total = providers.forward_fn("read", inputs)()
    providers.check_forward("read", total, inputs)
    with pytest.raises(AssertionError, match="read"):
        providers.check_forward("read", total + 1e-2 * inputs["hidden"].abs().sum(), inputs)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_compile_gradients_match_the_spec_and_a_wrong_gradient_fails(dtype):
    inputs = providers.make_inputs(*SHAPE, providers.DTYPES[dtype], seed=5)
    grads_out = providers.upstream(SHAPE[0], SHAPE[1], seed=6)
    grads = providers.backward_fn("compile", inputs, grads_out)()
    providers.check_gradients(grads, inputs, grads_out)
    grad_weight = grads[1].clone()
    grad_weight[7] *= 1.01
    with pytest.raises(AssertionError, match="grad_weight"):
        providers.check_gradients((grads[0], grad_weight, grads[2]), inputs, grads_out)


def _bench(kind, dtype, provider, median):
    return {"extra_info": {"kind": kind, "provider": provider, "dtype": dtype, "B": 8, "T": 1024, "H": 2048},
            "stats": {"median": median, "q1": median * 0.9, "q3": median * 1.1, "rounds": 5}}


def _paired(entry, median):
    entry["extra_info"]["floor_ratio"] = {"median": median, "q1": median - 0.1, "q3": median + 0.1, "rounds": 40}
    return entry


def test_report_divides_medians_within_one_run():
    run = {"benchmarks": [
        _paired(_bench("forward", "float32", "cpu", 2e-3), 1.1), _bench("forward", "float32", "eager", 5e-3),
        _paired(_bench("forward", "float32", "compile", 3e-3), 1.65), _bench("forward", "float32", "read", 1.6e-3),
        _paired(_bench("forward", "float32", "dense", 2.4e-3), 1.3),
        _bench("forward+backward", "bfloat16", "cpu", 10e-3), _bench("forward+backward", "bfloat16", "eager", 40e-3),
        _bench("forward+backward", "bfloat16", "compile", 9e-3),
        {"extra_info": {}, "stats": {"median": 1.0}},  # a benchmark of another suite is ignored
    ]}
    found = report.groups(run)
    assert set(found) == {("forward", "float32", 8, 1024, 2048), ("forward+backward", "bfloat16", 8, 1024, 2048)}
    forward = {name: (value, verdict) for name, value, verdict in
               report.ratios("forward", "float32", found[("forward", "float32", 8, 1024, 2048)])}
    assert forward["eager / cpu"] == (pytest.approx(2.5), ">= 1.5x: met")
    assert forward["compile / cpu"] == (pytest.approx(1.5), "")
    assert forward["compile / cpu, over the floor"] == (pytest.approx(1.5), "> 1x: met")  # 1.65 / 1.1
    assert forward["cpu / read floor, paired"] == (pytest.approx(1.1), "[1.00, 1.20] <= 1.15x: met")
    assert forward["dense / read floor, paired"] == (pytest.approx(1.3), "[1.20, 1.40] <= 1.15x: NOT met")
    backward = {name: (value, verdict) for name, value, verdict in
                report.ratios("forward+backward", "bfloat16", found[("forward+backward", "bfloat16", 8, 1024, 2048)])}
    assert backward["eager / cpu"] == (pytest.approx(4.0), ">= 3.0x: met")
    assert backward["best of eager, compile / cpu"] == (pytest.approx(0.9), ">= 1x: NOT met")
    assert "forward+backward bfloat16 B=8 T=1024 H=2048" in report.report(run)


class _FakeBenchmark:
    """pytest-benchmark's pedantic(), its per-round data and extra_info, on a fake clock."""

    def __init__(self, clock):
        self.clock, self.extra_info, self.stats = clock, {}, None

    def pedantic(self, fn, setup, rounds, iterations):
        assert iterations == 1
        data = []
        for _ in range(rounds):
            setup()
            start = self.clock.now
            fn()
            data.append(self.clock.now - start)
        self.stats = type("Metadata", (), {"stats": type("Stats", (), {"data": data})()})()


def test_paired_floor_ratio_is_per_round(monkeypatch):
    """The floor read doubles in time each round (a drifting machine) and each round's call takes 1.5x the read
    just before it: only rounds paired with their own read give 1.5 (a read one round off gives 0.75 or 3)."""

    class Clock:
        now, floor = 0.0, 0.5

    clock = Clock()

    def read_floor():
        clock.floor *= 2
        clock.now += clock.floor

    def call():
        clock.now += 1.5 * clock.floor

    monkeypatch.setattr(providers.time, "perf_counter", lambda: clock.now)
    monkeypatch.setattr(providers, "forward_fn", lambda provider, inputs: read_floor)
    bench = _FakeBenchmark(clock)
    providers.paired_with_floor(bench, call, inputs={}, rounds=7)
    assert bench.extra_info["floor_ratio"] == {"median": 1.5, "q1": 1.5, "q3": 1.5, "rounds": 7, "floor_median": 8.0}


def test_varlen_gradient_check_fails_on_a_wrong_gradient():
    import test_varlen_cpu  # noqa: E402  (benchmarks/ is on the path above)

    padded, packed = test_varlen_cpu.make_inputs(*SHAPE, torch.float32, seed=7)
    _, grads_out = test_varlen_cpu.upstream(padded, seed=8)
    grads = test_varlen_cpu.backward_fn("compile", padded, packed, grads_out)()
    test_varlen_cpu.check_varlen_gradients(grads, packed, grads_out)
    grad_hidden = grads[0].clone()
    grad_hidden[3, 5] *= 1.01
    with pytest.raises(AssertionError, match="grad_hidden"):
        test_varlen_cpu.check_varlen_gradients((grad_hidden, grads[1], grads[2]), packed, grads_out)


def test_report_compares_varlen_with_dense_at_the_real_tokens_share():
    def bench(provider, median, nnz=4096):
        entry = _bench("varlen forward", "bfloat16", provider, median)
        entry["extra_info"]["nnz"] = nnz  # half of B * T = 8 * 1024
        return entry

    run = {"benchmarks": [bench("varlen", 5e-3), bench("padded", 7e-3), bench("dense", 9e-3),
                          bench("compile", 20e-3)]}
    key = ("varlen forward", "bfloat16", 8, 1024, 2048)
    assert report.real_token_shares(run) == {key: 0.5}
    rows = {name: (value, verdict) for name, value, verdict in
            report.ratios("varlen forward", "bfloat16", report.groups(run)[key], 0.5)}
    assert rows["varlen / dense"] == (pytest.approx(5 / 9), "<= 1.15 x nnz share 0.500: met")
    assert rows["varlen / padded"] == (pytest.approx(5 / 7), "")
    assert rows["compile / varlen"][0] == pytest.approx(4.0)
    run["benchmarks"][0]["stats"]["median"] = 6e-3  # 0.67 > 1.15 * 0.5
    assert "NOT met" in report.report(run)
