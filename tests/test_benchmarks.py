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


def test_report_divides_medians_within_one_run():
    run = {"benchmarks": [
        _bench("forward", "float32", "cpu", 2e-3), _bench("forward", "float32", "eager", 5e-3),
        _bench("forward", "float32", "compile", 3e-3), _bench("forward", "float32", "read", 1.6e-3),
        _bench("forward+backward", "bfloat16", "cpu", 10e-3), _bench("forward+backward", "bfloat16", "eager", 40e-3),
        _bench("forward+backward", "bfloat16", "compile", 9e-3),
        {"extra_info": {}, "stats": {"median": 1.0}},  # a benchmark of another suite is ignored
    ]}
    found = report.groups(run)
    assert set(found) == {("forward", "float32", 8, 1024, 2048), ("forward+backward", "bfloat16", 8, 1024, 2048)}
    forward = {name: (value, verdict) for name, value, verdict in
               report.ratios("forward", "float32", found[("forward", "float32", 8, 1024, 2048)])}
    assert forward["eager / cpu"] == (pytest.approx(2.5), ">= 1.5x: met")
    assert forward["compile / cpu"] == (pytest.approx(1.5), "> 1x: met")
    assert forward["cpu / read floor"] == (pytest.approx(1.25), "<= 1.15x: NOT met")
    backward = {name: (value, verdict) for name, value, verdict in
                report.ratios("forward+backward", "bfloat16", found[("forward+backward", "bfloat16", 8, 1024, 2048)])}
    assert backward["eager / cpu"] == (pytest.approx(4.0), ">= 3.0x: met")
    assert backward["best of eager, compile / cpu"] == (pytest.approx(0.9), ">= 1x: NOT met")
    assert "forward+backward bfloat16 B=8 T=1024 H=2048" in report.report(run)


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
