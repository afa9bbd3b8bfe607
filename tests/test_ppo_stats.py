"""The statistics of the demo and the study: Student-t quantiles against the table, the t-interval, the exact
sign test and paired differences by hand, and the coverage of the interval by simulation at the study's seed count."""

import math

import pytest

from red_ppo.stats import interval_coverage, paired_difference, sign_test, t_interval, t_quantile
from red_ppo.study_config import StudyConfig

# t_{0.975} with df degrees of freedom, as printed in tables of Student's t (the normal's 1.959964 at df -> inf)
T_975 = {1: 12.706204736, 2: 4.302652730, 4: 2.776445105, 9: 2.262157163, 29: 2.045229642, 10**7: 1.959964}


@pytest.mark.parametrize("df", list(T_975), ids=lambda df: f"df{df}")
def test_t_quantile_against_the_table(df):
    assert t_quantile(0.975, df) == pytest.approx(T_975[df], abs=1e-6)
    assert t_quantile(0.025, df) == pytest.approx(-T_975[df], abs=1e-6)


@pytest.mark.parametrize("p", [1e-9, 0.01, 0.2, 0.5, 0.7, 0.95, 0.999, 1 - 1e-9])
def test_t_quantile_against_the_closed_forms_for_one_and_two_degrees_of_freedom(p):
    # df = 1 is the Cauchy distribution, tail q at cot(pi q) (the cotangent of the tail keeps its digits near 0 and
    # 1); df = 2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    cauchy = math.copysign(1 / math.tan(math.pi * min(p, 1 - p)), p - 0.5)
    assert t_quantile(p, 1) == pytest.approx(cauchy, rel=1e-9, abs=1e-12)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9, abs=1e-12)


def test_t_quantile_rejects_bad_arguments():
    for p in (0.0, 1.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"p: expected a probability in \(0, 1\)"):
            t_quantile(p, 3)
    for df in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="df: expected an integer >= 1"):
            t_quantile(0.9, df)


def test_t_interval_by_hand():
    # [1, -1, 2]: mean 2/3, squared deviations 1/9 + 25/9 + 16/9 = 14/3, sd sqrt(7/3), half t_{0.975, 2} sd / sqrt 3
    half = T_975[2] * math.sqrt(7 / 3) / math.sqrt(3)
    assert t_interval([1.0, -1.0, 2.0]) == pytest.approx((2 / 3, 2 / 3 - half, 2 / 3 + half), abs=1e-8)
    # None and non-finite values are dropped; at 90%, t_{0.95, 2} = 2.919986 (table)
    half90 = 2.919985580 * math.sqrt(7 / 3) / math.sqrt(3)
    assert t_interval([1.0, None, -1.0, math.nan, 2.0, math.inf], level=0.9) == pytest.approx(
        (2 / 3, 2 / 3 - half90, 2 / 3 + half90), abs=1e-8)
    assert t_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    assert t_interval([3.0]) == (3.0, -math.inf, math.inf)
    assert all(math.isnan(v) for v in t_interval([None, math.nan]))
    for level in (0.0, 1.0, 95):
        with pytest.raises(ValueError, match=r"level: expected a number in \(0, 1\)"):
            t_interval([1.0, 2.0], level=level)


def test_sign_test_exact_values():
    assert sign_test([0.5] * 10) == 2 / 1024
    assert sign_test([-0.5] * 10) == 2 / 1024
    assert sign_test([0.5] * 10 + [0.0] * 5 + [None, math.nan]) == 2 / 1024  # ties and missing values dropped
    assert sign_test([1.0] * 9 + [-1.0]) == 2 * (1 + 10) / 1024
    assert sign_test([-0.2, -0.1, -0.3, -0.4, 0.1]) == 2 * (1 + 5) / 32  # 4 of 5 seeds one way: p = 0.375
    assert sign_test([1.0, -1.0]) == 1.0
    assert sign_test([]) == 1.0 and sign_test([0.0, 0.0]) == 1.0


def test_paired_difference_by_hand():
    a = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0, 5: 9.0, 6: None}
    b = {0: 0.0, 1: 3.0, 2: 1.0, 3: 4.0, 6: 1.0, 7: 4.0}
    d = paired_difference(a, b)
    assert set(d) == {"seeds", "differences", "mean", "sd", "ci95", "sign_p", "positive", "negative", "ties", "n"}
    # seeds 5 and 7 are in one dict only; seed 6 has no value in a
    assert d["seeds"] == [0, 1, 2, 3, 6] and d["differences"] == [1.0, -1.0, 2.0, 0.0]
    # mean 1/2, squared deviations 1/4 + 9/4 + 9/4 + 1/4 = 5, sd sqrt(5/3); t_{0.975, 3} = 3.182446 (table)
    half = 3.182446305 * math.sqrt(5 / 3) / 2
    assert d["mean"] == 0.5 and d["sd"] == pytest.approx(math.sqrt(5 / 3))
    assert d["ci95"] == pytest.approx([0.5 - half, 0.5 + half], abs=1e-8)
    assert (d["positive"], d["negative"], d["ties"], d["n"]) == (2, 1, 1, 4)
    assert d["sign_p"] == 1.0  # 2 up, 1 down
    one = paired_difference({0: 2.0}, {0: 1.5})
    assert one["ci95"] == [-math.inf, math.inf] and math.isnan(one["sd"]) and one["sign_p"] == 1.0
    none = paired_difference({0: 1.0}, {1: 1.0})
    assert none["n"] == 0 and math.isnan(none["mean"]) and none["sign_p"] == 1.0


# The coverage estimate c over `trials` independent samples is Binomial(trials, p) / trials, of standard error
# se = sqrt(p (1 - p) / trials); trials * p * (1 - p) is in the thousands, so c is normal to a good approximation
# and lies beyond K se of p with probability 2 * (1 - Phi(4)) = 6e-5: a correct method fails this test for about
# one seed in 16,000. A wrong one is far outside: the normal quantile in place of t (the bootstrap's limit) covers
# P(|t_9| < 1.96) = 0.918 at n = 10 and P(|t_29| < 1.96) = 0.940 at n = 30, 145 and 44 se below 0.95 at 10**6 trials.
K = 4


def test_t_interval_covers_95_percent_at_the_study_seed_count():
    n, trials = len(StudyConfig().seeds), 10**6
    se = math.sqrt(0.95 * 0.05 / trials)
    assert interval_coverage(n, trials, distribution="normal", method="t") == pytest.approx(0.95, abs=K * se)


def test_percentile_bootstrap_under_covers_at_three_seeds():
    # At n = 3 an index triple repeating the smallest value has probability 1/27 > 2.5%, so the bootstrap's 2.5% and
    # 97.5% quantiles are the sample's min and max (but for about 0.3% of samples at 2000 resamples, where the min's
    # or the max's triple is drawn fewer than 51 times): it covers with P(min < mu < max) = 1 - 2 / 2^3 = 0.75 for any
    # continuous distribution whose median is its mean mu, far below the nominal 95% (the issue measured 75.6%).
    trials = 4000
    se = math.sqrt(0.75 * 0.25 / trials)
    bootstrap = interval_coverage(3, trials, distribution="normal", method="bootstrap")
    assert bootstrap == pytest.approx(0.75, abs=K * se)
    # the t-interval on the same samples keeps its 95%
    t = interval_coverage(3, trials, distribution="normal", method="t")
    assert t == pytest.approx(0.95, abs=K * math.sqrt(0.95 * 0.05 / trials))


def test_interval_coverage_rejects_bad_arguments():
    for kwargs, message in ((dict(n=1), "n: expected an integer >= 2"),
                            (dict(trials=0), "trials: expected an integer >= 1"),
                            (dict(distribution="cauchy"), "distribution: expected one of"),
                            (dict(method="z"), "method: expected one of"),
                            (dict(level=1.0), r"level: expected a number in \(0, 1\)"),
                            (dict(method="bootstrap", resamples=0), "resamples: expected an integer >= 1")):
        arguments = {"n": 5, "trials": 10, **kwargs}
        with pytest.raises(ValueError, match=message):
            interval_coverage(arguments.pop("n"), arguments.pop("trials"), **arguments)
