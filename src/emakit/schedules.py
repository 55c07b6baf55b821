"""Decay schedules: plain values that say how much of the old average to keep.

A schedule is any callable ``f(t, dt) -> decay``: for an update that moves time from
``t - dt`` to ``t`` it returns the coefficient ``decay`` in ``[0, 1]`` of::

    ema = decay * ema + (1 - decay) * weights

Time ``t`` is in whatever monotone unit the caller counts (optimizer steps, images seen);
``dt > 0`` is the time since the previous update. Schedules are pure functions of
``(t, dt)`` evaluated on the host, so computing a decay never touches a device.

Every schedule here is exact for any ``dt`` sequence: updating every ``k`` steps with
``dt=k`` gives the same average as ``k`` single-step updates of an unchanging model.

    >>> from emakit import schedules
    >>> s = schedules.constant(0.999)
    >>> round(s(t=10, dt=1), 6), round(s(t=10, dt=4), 6)
    (0.999, 0.996006)
    >>> schedules.power(sigma_rel=0.10)(t=1, dt=1)   # the first update copies
    0.0

Besides the schedules this module holds the conversions between the ways of stating an
EMA length: ``sigma_rel <-> gamma`` (EDM2 power profiles), decay <-> half-life, and the
relative width ``sigma_rel`` of a classic EMA at a given time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "Schedule",
    "constant",
    "halflife",
    "span",
    "power",
    "warmup",
    "start_at",
    "start_time",
    "sigma_rel_to_gamma",
    "gamma_to_sigma_rel",
    "halflife_to_decay",
    "decay_to_halflife",
    "decay_to_sigma_rel",
    "sigma_rel_to_decay",
    "SIGMA_REL_MAX",
]

#: Largest valid ``sigma_rel`` of a power profile (``gamma = 0``): ``12 ** -0.5``.
SIGMA_REL_MAX = 12.0**-0.5


@runtime_checkable
class Schedule(Protocol):
    """What ``EMA`` calls: ``decay = schedule(t, dt)`` with ``t`` the time after the update."""

    def __call__(self, t: float, dt: float) -> float: ...


def _check_real(name: str, where: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise TypeError(f"{where}: {name} must be a real number, got {name}={value!r}")
    return float(value)


def _check_time(where: str, t: float, dt: float) -> None:
    if not dt > 0:
        raise ValueError(f"{where}: dt must be > 0, got dt={dt}")
    if not t >= dt:
        raise ValueError(f"{where}: t must be >= dt (time starts at 0), got t={t}, dt={dt}")


# --------------------------------------------------------------------------- conversions


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the power profile ``p(tau) ∝ tau**gamma`` on ``[0, t]``.

    ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)**2 * (gamma + 3)))`` (EDM2, eq. 3).

        >>> round(gamma_to_sigma_rel(6.9372), 4)
        0.1
    """
    gamma = _check_real("gamma", "gamma_to_sigma_rel", gamma)
    if not gamma > -1:
        raise ValueError(f"gamma_to_sigma_rel: gamma must be > -1, got gamma={gamma}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Exponent ``gamma >= 0`` of the power profile whose relative width is ``sigma_rel``.

    ``gamma`` is the largest real root of
    ``gamma**3 + 7 gamma**2 + (16 - sigma_rel**-2) gamma + (12 - sigma_rel**-2) = 0``
    (EDM2, App. C.2); valid for ``0 < sigma_rel < 12**-0.5 ≈ 0.2887``. Smaller ``sigma_rel``
    means a longer memory: 0.05 → 16.97, 0.10 → 6.94, 0.20 → 1.83.

        >>> round(sigma_rel_to_gamma(0.05), 4)
        16.9722
    """
    s = _check_real("sigma_rel", "sigma_rel_to_gamma", sigma_rel)
    if not 0 < s < SIGMA_REL_MAX:
        raise ValueError(
            f"sigma_rel_to_gamma: sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}), got sigma_rel={sigma_rel}"
        )
    k = s**-2
    c2, c1, c0 = 7.0, 16.0 - k, 12.0 - k

    def f(g: float) -> float:
        return ((g + c2) * g + c1) * g + c0

    def df(g: float) -> float:
        return (3 * g + 2 * c2) * g + c1

    # Newton from above the largest root (Cauchy's bound). The cubic is convex for
    # g > -7/3, so the iterates decrease monotonically onto the largest root.
    g = 1.0 + max(abs(c2), abs(c1), abs(c0))
    for _ in range(200):
        step = f(g) / df(g)
        g -= step
        if abs(step) <= 1e-15 * max(1.0, abs(g)):
            break
    return g


def halflife_to_decay(halflife: float, dt: float = 1.0) -> float:
    """Decay per update of ``dt`` time units for a half-life in the same unit: ``2**(-dt/halflife)``.

    >>> halflife_to_decay(10.0, dt=10.0)
    0.5
    """
    h = _check_real("halflife", "halflife_to_decay", halflife)
    if not h > 0:
        raise ValueError(f"halflife_to_decay: halflife must be > 0, got halflife={halflife}")
    return 2.0 ** (-float(dt) / h)


def decay_to_halflife(decay: float, dt: float = 1.0) -> float:
    """Half-life, in time units, of a constant per-update ``decay`` applied every ``dt`` units.

    ``halflife = dt * ln 2 / -ln(decay)``; 0.9999 per step is a half-life of 6931 steps.

        >>> round(decay_to_halflife(0.9999))
        6931
    """
    d = _check_real("decay", "decay_to_halflife", decay)
    if not 0 < d < 1:
        raise ValueError(f"decay_to_halflife: decay must be in (0, 1), got decay={decay}")
    return float(dt) * math.log(2.0) / -math.log(d)


def decay_to_sigma_rel(decay: float, t: float) -> float:
    """Relative width at time ``t`` of a classic EMA with constant per-unit ``decay``.

    The exponential profile ``∝ decay**(t - tau)`` has standard deviation ``1 / -ln(decay)``;
    ``sigma_rel = 1 / (-ln(decay) * t)``. This ignores the truncation at ``tau = 0``, so it is
    accurate once ``t`` is several half-lives. At ``t = 1M`` steps, 0.9999 is ``sigma_rel ≈ 0.01``.

        >>> round(decay_to_sigma_rel(0.9999, t=1_000_000), 4)
        0.01
    """
    d = _check_real("decay", "decay_to_sigma_rel", decay)
    if not 0 < d < 1:
        raise ValueError(f"decay_to_sigma_rel: decay must be in (0, 1), got decay={decay}")
    if not t > 0:
        raise ValueError(f"decay_to_sigma_rel: t must be > 0, got t={t}")
    return 1.0 / (-math.log(d) * float(t))


def sigma_rel_to_decay(sigma_rel: float, t: float) -> float:
    """Per-unit decay of the classic EMA whose relative width at time ``t`` is ``sigma_rel``.

    Inverse of :func:`decay_to_sigma_rel`: ``decay = exp(-1 / (sigma_rel * t))``.

        >>> round(sigma_rel_to_decay(0.01, t=1_000_000), 6)
        0.9999
    """
    s = _check_real("sigma_rel", "sigma_rel_to_decay", sigma_rel)
    if not s > 0:
        raise ValueError(f"sigma_rel_to_decay: sigma_rel must be > 0, got sigma_rel={sigma_rel}")
    if not t > 0:
        raise ValueError(f"sigma_rel_to_decay: t must be > 0, got t={t}")
    return math.exp(-1.0 / (s * float(t)))


def start_time(total: float, decay: float, ignored_weight: float = 0.01) -> float:
    """When to start a constant-``decay`` EMA so that training before it weighs ``ignored_weight``.

    The weights held up to ``t0`` carry ``decay**(total - t0)`` of the average at ``total``;
    ``t0 = total - ln(ignored_weight) / ln(decay)``, rounded down to a whole unit and never
    below 0. Stable Diffusion's 0.9999 EMA needs only the last 46,050 steps for a 1% cut:

        >>> start_time(1_400_000, decay=0.9999)
        1353950.0

    Use it as ``schedules.start_at(start_time(total, d), schedules.constant(d))``.
    """
    total = _check_real("total", "start_time", total)
    d = _check_real("decay", "start_time", decay)
    eps = _check_real("ignored_weight", "start_time", ignored_weight)
    if not total >= 0:
        raise ValueError(f"start_time: total must be >= 0, got total={total}")
    if not 0 < d < 1:
        raise ValueError(f"start_time: decay must be in (0, 1), got decay={decay}")
    if not 0 < eps < 1:
        raise ValueError(f"start_time: ignored_weight must be in (0, 1), got ignored_weight={ignored_weight}")
    length = math.ceil(math.log(eps) / math.log(d))
    return float(max(0.0, math.floor(total - length)))


# --------------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class Constant:
    """``decay ** dt``: a classic EMA with a fixed per-unit decay. Build with :func:`constant`."""

    decay: float

    def __call__(self, t: float, dt: float) -> float:
        _check_time("constant", t, dt)
        return self.decay**dt


def constant(decay: float) -> Constant:
    """Classic EMA: ``decay ** dt`` per update (``decay`` per unit of time).

    Updating every ``k`` steps with ``dt=k`` uses ``decay**k``: the same average as ``k``
    single-step updates, not a ``k``-times longer one. Typical values: 0.9999 (Stable
    Diffusion, half-life 6.9k steps), 0.999 (693 steps), 0.995 (small models, 138 steps).

        >>> constant(0.5)(t=3, dt=2)
        0.25
    """
    d = _check_real("decay", "constant", decay)
    if not 0 <= d <= 1:
        raise ValueError(f"constant: decay must be in [0, 1], got decay={decay}")
    return Constant(d)


@dataclass(frozen=True)
class HalfLife:
    """``2 ** (-dt / halflife)``. Build with :func:`halflife`."""

    halflife: float

    def __call__(self, t: float, dt: float) -> float:
        _check_time("halflife", t, dt)
        return 2.0 ** (-dt / self.halflife)


def halflife(halflife: float) -> HalfLife:
    """Classic EMA stated by its half-life, in the unit of ``t``: ``decay = 2 ** (-dt / halflife)``.

    Half-lives are the convenient unit when time counts images (EDM: 500k images), because
    they do not change with the batch size.

        >>> halflife(100)(t=200, dt=100)
        0.5
    """
    h = _check_real("halflife", "halflife", halflife)
    if not h > 0:
        raise ValueError(f"halflife: halflife must be > 0, got halflife={halflife}")
    return HalfLife(h)


def span(n: float) -> Constant:
    """Classic EMA stated as a span (pandas' ``ewm(span=n)``): ``alpha = 2 / (n + 1)`` per unit.

    The per-unit decay is ``1 - 2 / (n + 1)``; a span of 1 copies the weights.

        >>> span(3)(t=1, dt=1)
        0.5
    """
    n = _check_real("n", "span", n)
    if not n >= 1:
        raise ValueError(f"span: n must be >= 1, got n={n}")
    return Constant(1.0 - 2.0 / (n + 1.0))


@dataclass(frozen=True)
class Power:
    """``(1 - dt / t) ** (gamma + 1)``: the EDM2 power-function EMA. Build with :func:`power`."""

    gamma: float

    @property
    def sigma_rel(self) -> float:
        return gamma_to_sigma_rel(self.gamma)

    def __call__(self, t: float, dt: float) -> float:
        _check_time("power", t, dt)
        return (1.0 - dt / t) ** (self.gamma + 1.0)


def power(sigma_rel: float | None = None, *, gamma: float | None = None) -> Power:
    """Power-function EMA (Karras et al., EDM2): ``decay = (1 - dt / t) ** (gamma + 1)``.

    The average at time ``t`` weights the trajectory by ``p(tau) ∝ tau**gamma`` on
    ``[0, t]``: its length is a fixed fraction of training (``sigma_rel``) whatever the run
    length, and the initial weights get no weight (the first update copies). Exact for any
    ``dt`` sequence. Give exactly one of ``sigma_rel`` (EDM2 found 0.05–0.15 best for FID) or
    ``gamma`` (``gamma > -1``; 6.94 is ``sigma_rel`` 0.10).

        >>> round(power(sigma_rel=0.10).gamma, 4)
        6.9372
        >>> power(gamma=1.0)(t=2, dt=1)
        0.25
    """
    if (sigma_rel is None) == (gamma is None):
        raise ValueError(f"power: give exactly one of sigma_rel or gamma, got sigma_rel={sigma_rel}, gamma={gamma}")
    if sigma_rel is not None:
        return Power(sigma_rel_to_gamma(sigma_rel))
    g = _check_real("gamma", "power", gamma)
    if not g > -1:
        raise ValueError(f"power: gamma must be > -1, got gamma={gamma}")
    return Power(g)


@dataclass(frozen=True)
class Warmup:
    """``1 - (1 + s / inv_gamma) ** -power``, clamped. Build with :func:`warmup`."""

    inv_gamma: float
    power: float
    min_decay: float
    max_decay: float

    def per_step(self, s: float) -> float:
        value = 1.0 - (1.0 + s / self.inv_gamma) ** -self.power
        return min(self.max_decay, max(self.min_decay, value))

    def __call__(self, t: float, dt: float) -> float:
        _check_time("warmup", t, dt)
        start = t - dt
        if float(dt).is_integer() and float(start).is_integer():
            # Whole steps: the exact product of the per-step decays (one term per step).
            out = 1.0
            for s in range(int(start), int(t)):
                out *= self.per_step(s)
            return out
        # Fractional time: the decay at the start of the interval, per unit of time.
        return self.per_step(start) ** dt


def warmup(
    inv_gamma: float = 1.0, power: float = 2.0 / 3.0, min_decay: float = 0.0, max_decay: float = 0.9999
) -> Warmup:
    """Decay that ramps up with time (k-diffusion / diffusers / timm):
    ``decay(s) = clamp(1 - (1 + s / inv_gamma) ** -power, min_decay, max_decay)``.

    ``s`` counts whole steps before the update, so the first update (``s = 0``) copies.
    ``power = 2/3`` reaches 0.999 at 31.6k steps and 0.9999 at 1M; ``power = 3/4`` reaches
    0.999 at 10k and 0.9999 at 215k (good for short runs). For ``dt = k`` whole steps the
    per-step decays are multiplied; for fractional time the decay at the start of the
    interval is raised to ``dt``.

        >>> w = warmup(power=1.0)
        >>> w(t=1, dt=1), w(t=2, dt=1), round(w(t=3, dt=2), 6)  # 3rd: 0.5 * 2/3
        (0.0, 0.5, 0.333333)
    """
    ig = _check_real("inv_gamma", "warmup", inv_gamma)
    p = _check_real("power", "warmup", power)
    lo = _check_real("min_decay", "warmup", min_decay)
    hi = _check_real("max_decay", "warmup", max_decay)
    if not ig > 0:
        raise ValueError(f"warmup: inv_gamma must be > 0, got inv_gamma={inv_gamma}")
    if not p > 0:
        raise ValueError(f"warmup: power must be > 0, got power={power}")
    if not 0 <= lo <= hi <= 1:
        raise ValueError(
            f"warmup: need 0 <= min_decay <= max_decay <= 1, got min_decay={min_decay}, max_decay={max_decay}"
        )
    return Warmup(ig, p, lo, hi)


@dataclass(frozen=True)
class StartAt:
    """Copy until ``t0``, then ``schedule`` on the time since ``t0``. Build with :func:`start_at`."""

    t0: float
    schedule: Callable[[float, float], float]

    def __call__(self, t: float, dt: float) -> float:
        _check_time("start_at", t, dt)
        if t - dt < self.t0:
            # The update reaches t0 or spans it: the average restarts there as a copy of the weights
            # held over the whole update, so the old average gets no weight.
            return 0.0
        # The inner schedule sees the time since t0.
        return self.schedule(t - self.t0, dt)


def start_at(t0: float, schedule: Callable[[float, float], float]) -> StartAt:
    """Copy the weights (decay 0) until time ``t0``, then average with ``schedule``.

    Averaging only the final part of training saves the update cost for most of it: a
    0.9999 EMA gives the first ``N - 46k`` steps under 1% weight anyway (see
    :func:`start_time`). The inner schedule sees the time since ``t0`` (a power or warm-up
    schedule starts afresh there).

        >>> s = start_at(100, constant(0.9))
        >>> s(t=100, dt=1), s(t=101, dt=1)
        (0.0, 0.9)
    """
    t0 = _check_real("t0", "start_at", t0)
    if not t0 >= 0:
        raise ValueError(f"start_at: t0 must be >= 0, got t0={t0}")
    if not callable(schedule):
        raise TypeError(f"start_at: schedule must be callable f(t, dt) -> decay, got {schedule!r}")
    return StartAt(t0, schedule)
