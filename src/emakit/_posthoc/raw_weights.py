"""How much each raw checkpoint weighs in an average, and how well the checkpoints support it.

The EMA at time ``T`` is an integral of the training trajectory against a profile: a density
``p(tau)`` on ``[0, T]`` of total mass 1 (EDM2's power profile ``p ∝ tau**gamma``, or the
classic EMA's ``p ∝ decay**(T - tau)`` with the mass of the starting weights at 0). From
checkpoints ``theta(t_1), ..., theta(t_n)`` the trajectory between two of them is taken to be
the straight line (hat-function, i.e. piecewise-linear quadrature), so checkpoint ``i`` weighs

    w_i = ∫ p(tau) h_i(tau) dtau,   h_i the hat that is 1 at t_i and 0 at t_{i-1} and t_{i+1},

computed in closed form from the profile's mass ``F`` and first moment ``M``. Why linear:
it is exact for a trajectory that is linear between checkpoints, second-order for a smooth
one, and for SGD's noisy trajectory (a random walk between the checkpoints it is pinned to,
a Brownian bridge) the straight line is the bridge's mean, the best estimate given the
checkpoints. The mass before the first checkpoint cannot be seen; it goes to the first
checkpoint (the trajectory held constant) and is reported.

Error estimate: under the same random-walk model, the rebuilt average differs from the exact
one by a zero-mean error whose variance per element is ``sum_i sigma_i**2 * Q_i``: ``Q_i``
the profile's double integral against the bridge covariance on interval ``i``
(Gauss–Legendre), ``sigma_i**2`` the squared change per element and unit of time measured
between the two checkpoints (which includes the drift, so the estimate errs on the large
side); before the first checkpoint, ``sigma_1**2 * t_1 * F(t_1)**2`` bounds it. The
reported figure is :data:`MARGIN` times the square root of that sum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import schedules

#: The reported error is this times the random-walk model's expected rms: a margin for what the
#: model leaves out (steps instead of continuous time, noise that changes within an interval).
#: On the synthetic runs of ``benchmarks/bench_average.py`` the model alone is within 0.95-1.2x of
#: the measured error.
MARGIN = 1.25
#: A checkpoint whose weight is below this (e.g. early checkpoints under a short EMA) is not read.
NEGLIGIBLE = 1e-10


@dataclass(frozen=True)
class Profile:
    """The target average's profile on ``[0, T]``: ``F(tau)`` its mass on ``[0, tau]``."""

    kind: str  # "power" or "exponential"
    T: float
    gamma: float = 0.0  # power
    rate: float = 0.0  # exponential: -log(decay) per unit of t

    def label(self) -> str:
        if self.kind == "power":
            return f"sigma_rel={schedules.gamma_to_sigma_rel(self.gamma):.6g} at t={self.T:g}"
        return f"decay={math.exp(-self.rate):.8g} per unit of t at t={self.T:g}"

    def mass(self, tau: Tensor) -> Tensor:
        """``F(tau)`` (the classic EMA's mass at 0 included)."""
        tau = tau.clamp(0, self.T)
        if self.kind == "power":
            return (tau / self.T) ** (self.gamma + 1)
        return torch.exp(-self.rate * (self.T - tau))

    def moment(self, tau: Tensor) -> Tensor:
        """``M(tau) = ∫_0^tau s p(s) ds``."""
        tau = tau.clamp(0, self.T)
        F = self.mass(tau)
        if self.kind == "power":
            return (self.gamma + 1) / (self.gamma + 2) * tau * F
        return tau * F - (F - math.exp(-self.rate * self.T)) / self.rate

    def log_decays(self, first: int) -> Tensor:
        """``log decay_j`` of the update at each step ``j = first .. T`` (one update per unit of t)."""
        j = torch.arange(first, int(self.T) + 1, dtype=torch.float64)
        if self.kind == "power":  # emakit's PowerEMA: decay_j = (1 - 1/j)**(gamma + 1), the first update copies
            return (self.gamma + 1) * torch.log1p(-1 / j)
        return torch.full_like(j, -self.rate)

    def density(self, tau: Tensor) -> Tensor:
        if self.kind == "power":
            return (self.gamma + 1) / self.T * (tau / self.T) ** self.gamma
        return self.rate * torch.exp(-self.rate * (self.T - tau))


def profile(T: float, sigma_rel=None, gamma=None, decay=None, halflife=None) -> Profile:
    """The profile of exactly one of ``sigma_rel`` / ``gamma`` (power) or ``decay`` / ``halflife`` (classic)."""
    if sigma_rel is not None:
        return Profile("power", T, gamma=schedules.sigma_rel_to_gamma(sigma_rel))
    if gamma is not None:
        schedules.gamma_to_sigma_rel(gamma)  # checks gamma > -1
        return Profile("power", T, gamma=float(gamma))
    if halflife is not None:
        decay = schedules.halflife_to_decay(halflife)
    if not (isinstance(decay, (int, float)) and 0 < decay < 1):
        raise ValueError(f"posthoc.average_checkpoints: decay must be in (0, 1), got decay={decay!r}")
    return Profile("exponential", T, rate=-math.log(decay))


@dataclass
class Quadrature:
    """Each checkpoint's weight (sum 1) and what the error estimate needs."""

    weights: list[float]
    mass_before_first: float
    interval_mass: list[float]  # mass of the profile on [t_i, t_{i+1}]
    bridge: list[float]  # Q_i: variance per unit sigma**2 on [t_i, t_{i+1}]
    before_bound: float  # t_1 * F(t_1)**2


#: Up to this many steps between the first and the last checkpoint, integer times are treated as
#: steps of one update each (the EMA's exact discrete weights); beyond, the continuous profile.
MAX_DISCRETE = 1 << 24


def hat_weights(times: Sequence[float], p: Profile) -> Quadrature:
    """Piecewise-linear quadrature of ``p`` on checkpoints at ``times`` (increasing, the last == p.T).

    Integer times (steps) use the EMA's own discrete weights, one update per step: the mass of
    step ``k`` is ``(1 - decay_k) * prod_{j > k} decay_j``, split between the two checkpoints
    around ``k`` in proportion to its distance from each (checkpoints at every step give the
    exact EMA). Other times use the continuous profile, in closed form.
    """
    t = torch.tensor(list(times), dtype=torch.float64)
    discrete = bool((t == t.round()).all()) and t[-1] - t[0] <= MAX_DISCRETE
    w, before = _discrete(t, p) if discrete else _continuous(t, p)
    F = p.mass(t)
    return Quadrature(
        weights=(w / w.sum()).tolist(),
        mass_before_first=before,
        interval_mass=(F[1:] - F[:-1]).tolist(),
        bridge=[_bridge(p, float(a), float(b)) for a, b in zip(t[:-1], t[1:])],
        before_bound=float(t[0]) * before**2,
    )


def _continuous(t: Tensor, p: Profile) -> tuple[Tensor, float]:
    F, M = p.mass(t), p.moment(t)
    w = torch.zeros_like(t)
    dF, dM, h = F[1:] - F[:-1], M[1:] - M[:-1], t[1:] - t[:-1]
    rising = (dM - t[:-1] * dF) / h  # ∫ p (tau - a) / (b - a) over [a, b]
    w[1:] += rising
    w[:-1] += dF - rising
    w[0] += F[0]  # before the first checkpoint: held at its value
    return w.clamp_min(0), float(F[0])


def _discrete(t: Tensor, p: Profile) -> tuple[Tensor, float]:
    first = int(t[0])
    log_decay = p.log_decays(first + 1)  # the updates at steps first+1 .. T
    suffix = torch.flip(torch.cumsum(torch.flip(log_decay, [0]), 0), [0])  # sum over j >= m
    # kept[k]: the weight of the average at step k in the one at T, prod_{j > k} decay_j
    kept = torch.exp(torch.cat([suffix, torch.zeros(1, dtype=torch.float64)]))
    mass = kept.clone()
    mass[1:] *= -torch.expm1(log_decay)  # (1 - decay_k) * kept[k]; at the first step everything held
    first_decay = math.exp(float(p.log_decays(first)[0])) if first > 0 else 0.0  # step 0 is the start
    before = float(kept[0]) * first_decay  # what the average held before the first checkpoint
    k = torch.arange(first, int(t[-1]) + 1, dtype=torch.float64)
    right = torch.searchsorted(t, k, right=False).clamp(1, len(t) - 1) if len(t) > 1 else None
    w = torch.zeros_like(t)
    if right is None:
        return w + mass.sum(), before
    a, b = t[right - 1], t[right]
    share = ((k - a) / (b - a)).clamp(0, 1)
    w.index_add_(0, right, mass * share)
    w.index_add_(0, right - 1, mass * (1 - share))
    return w, before


def _gauss_legendre(n: int) -> tuple[Tensor, Tensor]:
    """Nodes and weights on [-1, 1] (Golub–Welsch)."""
    k = torch.arange(1, n, dtype=torch.float64)
    beta = k / torch.sqrt(4 * k * k - 1)
    nodes, vectors = torch.linalg.eigh(torch.diag(beta, 1) + torch.diag(beta, -1))
    return nodes, 2 * vectors[0] ** 2


_NODES, _WEIGHTS = _gauss_legendre(24)


def _bridge(p: Profile, a: float, b: float) -> float:
    """``∫∫ p(s) p(u) (min(s,u) - a)(b - max(s,u)) / (b - a) ds du`` over ``[a, b]**2``."""
    x = a + (b - a) * (_NODES + 1) / 2
    wp = _WEIGHTS * (b - a) / 2 * p.density(x)
    lo, hi = torch.minimum(x[:, None], x[None, :]), torch.maximum(x[:, None], x[None, :])
    K = (lo - a) * (b - hi) / (b - a)
    return float(wp @ K @ wp)


def error_estimate(q: Quadrature, change: Sequence[float | None], times: Sequence[float]) -> float:
    """Estimated rms error per element; ``change[i]``: mean squared change per element on interval ``i``."""
    total = 0.0
    rates = []
    for i, c in enumerate(change):
        rate = None if c is None else c / (times[i + 1] - times[i])
        rates.append(rate)
        if rate is not None:
            total += rate * q.bridge[i]
    first = next((r for r in rates if r is not None), 0.0)
    return MARGIN * math.sqrt(total + first * q.before_bound)
