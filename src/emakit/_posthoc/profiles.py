"""Inner products of EMA profiles, the math under the post-hoc solve (EDM2, App. C.3).

Owns the closed form for two power profiles and the quadrature for a power profile against
a classic (exponential) EMA profile. Pure float64 tensor math: no files, no models.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def power_inner(t_a: Tensor, gamma_a: Tensor, t_b: Tensor, gamma_b: Tensor) -> Tensor:
    """``<p_a, p_b>`` of two power profiles truncated at ``t_a`` and ``t_b`` (EDM2, eq. 20).

    For ``t_a <= t_b``: ``(gamma_a+1)(gamma_b+1) (t_a/t_b)**gamma_b / ((gamma_a+gamma_b+1) t_b)``,
    and symmetrically. The *ratio* is raised to the power: ``t**gamma`` overflows float64 for
    long runs. Broadcasts; use float64.

        >>> float(power_inner(*(torch.tensor(x, dtype=torch.float64) for x in (1.0, 0.0, 1.0, 0.0))))
        1.0
    """
    a_first = t_a <= t_b
    ratio = torch.where(a_first, t_a / t_b, t_b / t_a)
    exponent = torch.where(a_first, gamma_b, gamma_a)
    t_max = torch.maximum(t_a, t_b)
    return (gamma_a + 1) * (gamma_b + 1) * ratio**exponent / ((gamma_a + gamma_b + 1) * t_max)


# Gauss-Legendre rule on panels that crowd toward u = 1 (v = 1 - u on a log scale): the
# products of a power profile and a short exponential are peaked at the end of the interval.
def _quadrature() -> tuple[Tensor, Tensor]:
    nodes, weights = _gauss_legendre(24)
    edges = [0.0] + [10.0**e for e in range(-12, 0)] + [1.0]  # in v = 1 - u
    us, ws = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        v = lo + (hi - lo) * (nodes + 1) / 2
        us.append(1 - v)
        ws.append(weights * (hi - lo) / 2)
    return torch.cat(us), torch.cat(ws)


def _gauss_legendre(n: int) -> tuple[Tensor, Tensor]:
    """Nodes and weights on [-1, 1] (Golub-Welsch: eigenvalues of the Jacobi matrix)."""
    k = torch.arange(1, n, dtype=torch.float64)
    off = k / torch.sqrt(4 * k**2 - 1)
    jacobi = torch.diag(off, 1) + torch.diag(off, -1)
    nodes, vectors = torch.linalg.eigh(jacobi)
    return nodes, 2 * vectors[0] ** 2


_U, _W = _quadrature()


def exponential_inner(t_i: Tensor, gamma_i: Tensor, t_r: float, rate: float) -> Tensor:
    """``<p_i, q>`` of power profiles and the classic-EMA profile ``q`` at time ``t_r``.

    ``q(tau) = rate * exp(-rate (t_r - tau)) / (1 - exp(-rate t_r))`` on ``[0, t_r]`` (per-unit
    decay ``exp(-rate)``, truncated at 0 and normalised). Numerical quadrature in float64;
    needs ``t_i <= t_r``.
    """
    u = _U.to(t_i.dtype)
    w = _W.to(t_i.dtype)
    t_i, gamma_i = t_i.unsqueeze(-1), gamma_i.unsqueeze(-1)
    log_p = torch.log(gamma_i + 1) + gamma_i * torch.log(u)  # profile in u = tau / t_i, times t_i
    log_q = math.log(rate) - rate * (t_r - u * t_i) - math.log(-math.expm1(-rate * t_r))
    return (torch.exp(log_p + log_q) * w).sum(-1)


def _exponential_norm(t_r: float, rate: float) -> float:
    """``<q, q>`` of the classic-EMA profile (closed form)."""
    return rate * -math.expm1(-2 * rate * t_r) / (2 * math.expm1(-rate * t_r) ** 2)
