"""Fit errors from snapshot headers: how well a set of snapshots reconstructs a range of profiles.

Owns the one question :mod:`emakit.planning` asks of the post-hoc solve: the relative
profile error (and noise gain) of each target ``sigma_rel`` at a time, for real snapshot
headers or synthetic ones (:class:`_Snap`), and the worst of them over a range and times.
The same least squares as ``posthoc.solve_coefficients``, all targets in one solve, on one
thread (the solves are tiny).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .. import schedules
from .._posthoc.profiles import power_inner
from .._posthoc.solve import _normal_equations


class _Snap(NamedTuple):
    """What the normal equations read of a snapshot: its time and its profiles' gammas."""

    t: float
    gammas: tuple[float, ...]


def _solve(snaps: Sequence, sigma_rels: Sequence[float], t: float) -> tuple[list[float], list[float]]:
    """``(fit errors, noise gains)`` per target: one least-squares solve for all of them, with the same ``A``,
    SVD driver and normalisation to sum 1 as ``posthoc.solve_coefficients``."""
    used = sorted((s for s in snaps if 0 < s.t <= t), key=lambda s: s.t)
    if not used:
        return [math.inf] * len(sigma_rels), [math.inf] * len(sigma_rels)
    gammas = [schedules.sigma_rel_to_gamma(s) for s in sigma_rels]
    a, _, _ = _normal_equations(used, t, gammas[0], None)
    t_i = torch.tensor([s.t / t for s in used for _ in s.gammas], dtype=torch.float64)
    g_i = torch.tensor([g for s in used for g in s.gammas], dtype=torch.float64)
    g_r = torch.tensor(gammas, dtype=torch.float64)
    one = torch.ones((), dtype=torch.float64)
    b = power_inner(t_i[:, None], g_i[:, None], one, g_r[None, :])  # as _normal_equations, one column per target
    norm = power_inner(one, g_r, one, g_r)
    x = torch.linalg.lstsq(a, b, driver="gelsd").solution
    x = x / x.sum(0)
    fit = ((x * (a @ x)).sum(0) - 2 * (x * b).sum(0) + norm) / norm
    return [max(float(f), 0.0) for f in fit], [float(g) for g in x.abs().sum(0)]


@contextlib.contextmanager
def _one_thread():
    """Run torch on one thread meanwhile: the solves here are tiny, and thread start-up dominates them
    (measured on 2 busy cores: 0.4 ms instead of 70 ms per solve). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _log_grid(lo: float, hi: float, n: int) -> list[float]:
    if lo == hi:
        return [lo]
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


def _worst(snaps: Sequence, targets: Sequence[float], at: Sequence[float]) -> tuple[float, float, float, float]:
    """``(worst fit error, its sigma_rel, its time, largest noise gain)`` over every target and time."""
    worst, gain = (-1.0, math.nan, math.nan), 0.0
    for t in at:
        errors, gains = _solve(snaps, targets, t)
        gain = max(gain, *gains)
        for s, e in zip(targets, errors):
            if e > worst[0]:
                worst = (e, s, t)
    return (*worst, gain)
