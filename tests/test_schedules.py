"""Schedules and conversions against closed forms, the EDM2 paper's numbers and numpy."""

import math

import numpy as np
import pytest

from emakit import schedules as S

PAPER_GAMMAS = {0.05: 16.9722, 0.10: 6.9372, 0.03: 30.317, 0.15: 3.5579, 0.20: 1.8262}


@pytest.mark.parametrize("sigma_rel,gamma", sorted(PAPER_GAMMAS.items()))
def test_sigma_rel_to_gamma_matches_paper_values(sigma_rel, gamma):
    assert S.sigma_rel_to_gamma(sigma_rel) == pytest.approx(gamma, abs=6e-4)


@pytest.mark.parametrize("sigma_rel", [0.001, 0.01, 0.05, 0.1, 0.2, 0.28, 0.2886])
def test_sigma_rel_to_gamma_is_largest_root_of_the_cubic(sigma_rel):
    k = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - k, 12.0 - k])
    largest = max(r.real for r in roots if abs(r.imag) < 1e-9)
    assert S.sigma_rel_to_gamma(sigma_rel) == pytest.approx(largest, rel=1e-9)
    assert S.gamma_to_sigma_rel(S.sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-12)


def test_gamma_to_sigma_rel_is_the_profile_std():
    # Relative std of p(tau) = (g+1) tau^g on [0, 1], by numerical integration.
    g = 6.9372
    tau = np.linspace(0, 1, 2_000_001)
    p = (g + 1) * tau**g
    mean = np.trapezoid(tau * p, tau)
    std = math.sqrt(np.trapezoid((tau - mean) ** 2 * p, tau))
    assert S.gamma_to_sigma_rel(g) == pytest.approx(std, rel=1e-6)


@pytest.mark.parametrize("bad", [0.0, -0.1, S.SIGMA_REL_MAX, 0.3, float("nan")])
def test_sigma_rel_out_of_range_names_the_value(bad):
    with pytest.raises((ValueError, TypeError), match="sigma_rel"):
        S.sigma_rel_to_gamma(bad)
    with pytest.raises((ValueError, TypeError), match="sigma_rel"):
        S.power(sigma_rel=bad)


def test_constant_is_consistent_in_dt():
    s = S.constant(0.99)
    stepwise = math.prod(s(t, 1) for t in range(11, 18))
    assert s(17, 7) == pytest.approx(stepwise, rel=1e-14)
    assert s(17, 7) == pytest.approx(0.99**7, rel=1e-15)


def test_halflife_and_span():
    assert S.halflife(100)(500, 100) == pytest.approx(0.5)
    assert S.halflife(100)(500, 50) == pytest.approx(2**-0.5)
    assert S.span(9)(3, 1) == pytest.approx(0.8)  # alpha = 2 / (9 + 1)
    assert S.span(1)(3, 1) == 0.0


def test_power_matches_the_interval_weights_for_any_dt():
    # Weight of the value held over (t_{j-1}, t_j] is (t_j^(g+1) - t_{j-1}^(g+1)) / t^(g+1).
    g = 3.0
    s = S.power(gamma=g)
    times = [3, 4, 9, 10, 17, 30]
    weights, prev = [], 0
    for t in times:
        decay = s(t, t - prev)
        weights = [w * decay for w in weights] + [1 - decay]
        prev = t
    expected = [(b ** (g + 1) - a ** (g + 1)) / times[-1] ** (g + 1) for a, b in zip([0] + times, times)]
    np.testing.assert_allclose(weights, expected, rtol=1e-13)
    assert s(5, 5) == 0.0  # the first update copies


def test_warmup_matches_the_stepwise_formula():
    w = S.warmup(inv_gamma=1.0, power=2 / 3, max_decay=0.9999)
    # k-diffusion / diffusers: the n-th update (n = 1, 2, ...) uses 1 - (1 + (n - 1)) ** -power.
    for n in [1, 2, 10, 1000, 10**7]:
        expected = min(0.9999, 1 - (1 + (n - 1)) ** (-2 / 3))
        assert w(n, 1) == pytest.approx(expected, rel=1e-14)
    assert w(10, 4) == pytest.approx(math.prod(w(t, 1) for t in range(7, 11)), rel=1e-14)
    assert S.warmup(power=0.75)(10_001, 1) == pytest.approx(0.999, rel=1e-6)


def test_warmup_fractional_time_uses_the_start_of_the_interval():
    w = S.warmup(power=1.0)
    assert w(2.5, 0.5) == pytest.approx((1 - 1 / 3.0) ** 0.5)


def test_start_at_copies_then_averages_on_shifted_time():
    s = S.start_at(100, S.power(gamma=1.0))
    assert s(50, 1) == 0.0 and s(100, 1) == 0.0
    assert s(101, 1) == 0.0  # power restarts: its first update copies
    assert s(104, 1) == pytest.approx((1 - 1 / 4) ** 2)
    straddle = S.start_at(10, S.constant(0.5))
    # An update over (8, 12] is 4 single steps of an unchanged model: copies at 9 and 10, then
    # averages of the copy with the same weights; the old average is gone.
    assert straddle(12, 4) == 0.0
    assert straddle(14, 2) == pytest.approx(0.25)  # from t0 on, the inner schedule decides
    steps = [straddle(t, 1) for t in range(9, 13)]
    assert steps[:2] == [0.0, 0.0] and math.prod(steps) == straddle(12, 4)


def test_start_time_bounds_the_ignored_weight():
    d, total = 0.9999, 1_400_000
    t0 = S.start_time(total, decay=d, ignored_weight=0.01)
    assert d ** (total - t0) <= 0.01 < d ** (total - t0 - 1)
    assert S.start_time(100, decay=0.9) == 56.0  # 0.9**44 = 0.0097 <= 1% < 0.9**43
    assert S.start_time(10, decay=0.9999) == 0.0


def test_conversions_are_inverse():
    assert S.decay_to_halflife(S.halflife_to_decay(123.0)) == pytest.approx(123.0)
    assert S.halflife_to_decay(S.decay_to_halflife(0.999, dt=4), dt=4) == pytest.approx(0.999)
    assert S.sigma_rel_to_decay(S.decay_to_sigma_rel(0.9999, t=5e5), t=5e5) == pytest.approx(0.9999)


def test_decay_to_sigma_rel_is_the_exponential_profile_std():
    d, t = 0.999, 100_000
    tau = np.linspace(0, t, 4_000_001)
    p = d ** (t - tau)
    p /= np.trapezoid(p, tau)
    mean = np.trapezoid(tau * p, tau)
    std = math.sqrt(np.trapezoid((tau - mean) ** 2 * p, tau))
    assert S.decay_to_sigma_rel(d, t) == pytest.approx(std / t, rel=1e-3)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: S.constant(1.5), "decay"),
        (lambda: S.constant(-0.1), "decay"),
        (lambda: S.halflife(0), "halflife"),
        (lambda: S.span(0.5), "n"),
        (lambda: S.power(), "exactly one"),
        (lambda: S.power(sigma_rel=0.1, gamma=3), "exactly one"),
        (lambda: S.power(gamma=-1), "gamma"),
        (lambda: S.warmup(inv_gamma=0), "inv_gamma"),
        (lambda: S.warmup(min_decay=0.5, max_decay=0.4), "min_decay"),
        (lambda: S.start_at(-1, S.constant(0.9)), "t0"),
        (lambda: S.start_at(1, 0.9), "callable"),
        (lambda: S.start_time(100, decay=1.0), "decay"),
        (lambda: S.constant(0.9)(5, 0), "dt"),
        (lambda: S.constant(0.9)(1, 2), "t must be"),
        (lambda: S.constant("0.9"), "decay"),
    ],
)
def test_bad_input_names_the_parameter(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
