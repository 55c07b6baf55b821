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
from torch import Tensor

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


#: Up to this many snapshots, a prune considers them all (exact lazy greedy); beyond, a forward selection first.
EXACT_SNAPSHOTS = 32
#: At most this many snapshots are selected forward (far more than any fit needs).
_FORWARD_MAX = 96


def _forward(snaps: Sequence, targets: Sequence[float], t: float, stop: float) -> list[int]:
    """Snapshots in the order a forward selection adds them, from the last, until every target's error <= ``stop``.

    Each step adds the snapshot whose profiles cut the worst relative error of the targets
    most: Gram-Schmidt in the profiles' inner products (the least squares of
    :func:`_solve`, without its normalisation to sum 1), every candidate scored at once from
    its residual Gram block and its residual inner products with the targets. ``O(n)`` work
    per step, so a few dozen steps cost ``O(n)``, where one solve over all ``n`` snapshots is
    ``O(n**3)``.
    """
    p = len(snaps[0].gammas)
    t_i = torch.tensor([s.t / t for s in snaps for _ in s.gammas], dtype=torch.float64)
    g_i = torch.tensor([g for s in snaps for g in s.gammas], dtype=torch.float64)
    g_r = torch.tensor([schedules.sigma_rel_to_gamma(s) for s in targets], dtype=torch.float64)
    one = torch.ones((), dtype=torch.float64)
    norm = power_inner(one, g_r, one, g_r)
    error = norm.clone()  # squared residual of each target
    cross = power_inner(t_i[:, None], g_i[:, None], one, g_r[None, :])  # residual <profile, target>, (N, R)
    blocks = power_inner(t_i.view(-1, p, 1), g_i.view(-1, p, 1), t_i.view(-1, 1, p), g_i.view(-1, 1, p))
    floor = 1e-12 * blocks.diagonal(dim1=1, dim2=2).amax(1)  # below it, a residual is rounding noise
    columns: list[Tensor] = []
    order: list[int] = []
    pick = len(snaps) - 1
    while len(order) < min(len(snaps), _FORWARD_MAX):
        order.append(pick)
        for j in range(pick * p, pick * p + p):  # Gram-Schmidt: the picked profiles join the basis
            column = power_inner(t_i, g_i, t_i[j], g_i[j])
            if columns:
                done = torch.stack(columns)
                column = column - done.T @ done[:, j]
            if float(column[j]) <= 1e-14 * float(power_inner(t_i[j], g_i[j], t_i[j], g_i[j])):
                continue  # already spanned
            column = column / column[j].sqrt()
            columns.append(column)
            coef = cross[j].clone() / column[j]
            error = error - coef**2
            cross = cross - column[:, None] * coef[None, :]
            local = column.view(-1, p)
            blocks = blocks - local[:, :, None] * local[:, None, :]
        if float((error / norm).max()) <= stop:
            break
        c = cross.view(-1, p, len(targets))
        gain = (c * (torch.linalg.pinv(blocks, atol=floor, rtol=torch.zeros_like(floor), hermitian=True) @ c)).sum(
            1
        )  # (n, R)
        worst = ((error[None, :] - gain) / norm[None, :]).amax(1)
        worst[order] = math.inf
        pick = int(worst.argmin())
        if not math.isfinite(float(worst[pick])):
            break
    return order


def _prune_candidates(snaps: Sequence, targets: Sequence[float], t: float, max_fit_error: float):
    """``(choose among, fit from)``: the snapshots a prune chooses among, and a superset whose fit stands for
    all of them. Few: all, twice. Many: the shortest forward selection (:func:`_forward`) that meets
    ``max_fit_error`` (the others are dropped), and one run on to 1e-4 of it (fit errors far below it, as
    from all snapshots, within that)."""
    everything = list(range(len(snaps)))
    if len(snaps) <= EXACT_SNAPSHOTS or len({len(s.gammas) for s in snaps}) != 1:
        return everything, everything
    order = _forward(snaps, targets, t, 1e-4 * max_fit_error)
    for k in range(1, len(order) + 1):
        if _worst([snaps[i] for i in sorted(order[:k])], targets, [t])[0] <= max_fit_error:
            return sorted(order[:k]), sorted(order)
    return sorted(order), sorted(order)
