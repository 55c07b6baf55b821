"""The least-squares solve under post-hoc EMA: the target profile and the normal equations.

Owns reading a requested target (``sigma_rel``, ``gamma``, ``decay`` or ``halflife``) as a
power profile or a classic-EMA rate, and building ``A x = b`` (``A_ij = <p_i, p_j>``,
``b_i = <p_i, p_r>``) in float64 for :func:`emakit.posthoc.solve_coefficients` (and
:mod:`emakit.planning`). Reads no snapshot file: only the snapshots' headers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import schedules
from ..snapshots import SnapshotInfo
from .profiles import _exponential_norm, exponential_inner, power_inner


def _target(sigma_rel, gamma, decay, halflife) -> tuple[str, float | None, float | None]:
    """(label, gamma, rate) of the requested target; exactly one way of stating it."""
    given = {
        k: v
        for k, v in (("sigma_rel", sigma_rel), ("gamma", gamma), ("decay", decay), ("halflife", halflife))
        if v is not None
    }
    if len(given) != 1:
        raise ValueError(f"give exactly one of sigma_rel, gamma, decay or halflife, got {given or 'none'}")
    ((key, value),) = given.items()
    if key == "sigma_rel":
        return f"sigma_rel={value:g}", schedules.sigma_rel_to_gamma(value), None
    if key == "gamma":
        return f"gamma={value:g}", schedules.power(gamma=value).gamma, None
    if key == "decay":
        if not 0 < value < 1:
            raise ValueError(f"decay must be in (0, 1), got decay={value}")
        return f"decay={value:g}", None, -math.log(value)
    if not value > 0:
        raise ValueError(f"halflife must be > 0, got halflife={value}")
    return f"halflife={value:g}", None, math.log(2) / value


def _normal_equations(
    used: Sequence[SnapshotInfo], t: float, target_gamma: float | None, rate: float | None
) -> tuple[Tensor, Tensor, float]:
    """``(A, b, <p_r, p_r>)`` in float64, with time in units of ``t`` (well scaled at any run length)."""
    t_i, g_i = [], []
    for s in used:
        for g in s.gammas:
            t_i.append(s.t / t)
            g_i.append(g)
    t_i = torch.tensor(t_i, dtype=torch.float64)
    g_i = torch.tensor(g_i, dtype=torch.float64)
    a = power_inner(t_i[:, None], g_i[:, None], t_i[None, :], g_i[None, :])
    if target_gamma is not None:
        one = torch.ones((), dtype=torch.float64)
        gr = torch.tensor(target_gamma, dtype=torch.float64)
        return a, power_inner(t_i, g_i, one, gr), float(power_inner(one, gr, one, gr))
    rate_u = rate * t
    return a, exponential_inner(t_i, g_i, 1.0, rate_u), _exponential_norm(1.0, rate_u)
