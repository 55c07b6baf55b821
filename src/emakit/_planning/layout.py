"""The search behind :func:`emakit.planning.plan`: storage layouts, what each costs and reconstructs.

Owns :class:`Layout` (tracked profiles, snapshot interval, bytes per parameter, fit error),
the snapshot times of a layout, the default candidate profiles, and :class:`LayoutSearch`:
for a set of profiles the sparsest interval that meets the target (bisection over the
snapshot counts), and over every set of candidates the one with the fewest bytes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from .. import schedules
from .fit import _Snap, _worst

_BYTES_FP32 = 4


@dataclass(frozen=True)
class Layout:
    """One storage layout: tracked profiles, snapshot interval, and what it costs and reconstructs.

    Snapshots are saved every ``interval`` steps, at the last step and at each requested time
    (``snapshots`` in all: a reconstruction at ``t`` needs a snapshot at ``t``);
    ``bytes_per_parameter`` is ``snapshots * len(sigma_rels) * 4`` (fp32); ``fit_error`` is the
    worst relative profile error over the range and the requested times; ``noise_gain`` the
    largest ``sum |x|`` of the weights (how much the snapshots' rounding noise is amplified).
    """

    sigma_rels: tuple[float, ...]
    interval: int
    snapshots: int
    bytes_per_parameter: int
    fit_error: float
    noise_gain: float
    meets: bool


def _times(steps: int, interval: int, at: Sequence[float] = ()) -> list[float]:
    """Snapshot times when saving every ``interval`` steps, at the end, and at the times in ``at``."""
    return sorted({float(k) for k in range(interval, steps, interval)} | {float(steps)} | {float(t) for t in at})


def _candidates(lo: float, hi: float) -> list[float]:
    """Profiles to combine: a log grid through ``lo`` and ``hi`` (6 points), one step below, one above."""
    ratio = (hi / lo) ** (1 / 5) if hi > lo else 1.5
    values = {float(f"{lo * ratio**i:.3g}") for i in range(-1, 7)}
    return sorted(v for v in values if v < schedules.SIGMA_REL_MAX * 0.97)


@dataclass(frozen=True)
class LayoutSearch:
    """The layouts :func:`emakit.planning.plan` compares, for one run length, target and set of intervals.

    ``at``: the times every layout must reconstruct at; ``targets``: the grid of ``sigma_rel``
    over the range; ``intervals``: descending (ascending snapshot count).
    """

    steps: int
    at: tuple[float, ...]
    targets: list[float]
    max_fit_error: float
    intervals: list[int]

    def layout(self, profiles: tuple[float, ...], interval: int) -> Layout:
        gammas = tuple(schedules.sigma_rel_to_gamma(s) for s in profiles)
        times = _times(self.steps, interval, self.at)
        error, _, _, gain = _worst([_Snap(t, gammas) for t in times], self.targets, self.at)
        nbytes = len(times) * len(profiles) * _BYTES_FP32
        return Layout(profiles, interval, len(times), nbytes, error, gain, error <= self.max_fit_error)

    def fewest(self, profiles: tuple[float, ...], budget: float) -> Layout | None:
        """The sparsest interval meeting the target within ``budget`` bytes (bisection), or None."""
        steps, at = self.steps, self.at
        allowed = [k for k in self.intervals if len(_times(steps, k, at)) * len(profiles) * _BYTES_FP32 <= budget]
        if not allowed:
            return None
        top = self.layout(profiles, allowed[-1])
        if not top.meets:
            return None
        lo_i, hi_i, found = 0, len(allowed) - 1, top  # allowed[hi_i] meets
        while lo_i < hi_i:
            mid = (lo_i + hi_i) // 2
            candidate = self.layout(profiles, allowed[mid])
            if candidate.meets:
                hi_i, found = mid, candidate
            else:
                lo_i = mid + 1
        return found

    def best(self, cands: list[float], max_profiles: int, edm2: Layout) -> Layout | None:
        """The fewest bytes meeting the target: ``edm2`` (when it meets) or a set of 1..``max_profiles`` of ``cands``."""
        best = edm2 if edm2.meets else None
        sets = [c for p in range(1, max_profiles + 1) for c in itertools.combinations(cands, p)]
        for profiles in sets:
            budget = best.bytes_per_parameter if best is not None else math.inf
            found = self.fewest(tuple(profiles), budget)
            if found is not None and (
                best is None
                or (found.bytes_per_parameter, found.fit_error) < (best.bytes_per_parameter, best.fit_error)
            ):
                best = found
        return best
