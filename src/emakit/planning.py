"""Snapshot storage: how much to keep before training (:func:`plan`), what to drop after (:func:`prune`).

Both ask one question of the post-hoc solve (:mod:`emakit.posthoc`): is every ``sigma_rel``
in a range reconstructed with a relative profile error ``<= max_fit_error``? The fit error
depends only on the snapshot times and profiles, never on the weights, so it is answered
before a run starts (synthetic times) or from the snapshot headers alone.

- :func:`plan` searches tracked profiles (1-4 on a log grid around the range, plus EDM2's
  0.05, 0.10) and snapshot intervals for the fewest bytes per parameter that meet the target,
  and reports EDM2's default profiles at the same target beside it.
- :func:`prune` deletes the snapshots of a directory that no length in the range needs
  (greedy, never the last one). The decision is written to a journal first, then files are
  deleted one at a time: a killed prune leaves only unneeded files missing, and the next
  call finishes the journal.

    p = planning.plan(100_000, sigma_rel=(0.03, 0.2), max_fit_error=1e-3)
    print(p.best.sigma_rels, p.best.interval, p.best.bytes_per_parameter)
    report = planning.prune("run/phema", sigma_rel=(0.05, 0.15), max_fit_error=1e-3)
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import schedules
from ._files import collector as _collector
from ._planning.fit import _log_grid, _one_thread, _solve, _worst
from ._planning.layout import Layout, LayoutSearch, _candidates, _times  # noqa: F401 (_times: read by tests)
from ._planning.pruning import _finish, _greedy, _keyframe_bytes, _prune_candidates, _to_rekey, resume, write_journal
from .posthoc import FIT_ERROR_WARN, list_snapshots
from .snapshots import SnapshotError, snapshot_paths

__all__ = [
    "EDM2_PROFILES",
    "JOURNAL",
    "Layout",
    "Plan",
    "PruneReport",
    "fit_errors",
    "plan",
    "prune",
]

#: The profiles EDM2 tracks (and emakit's example): two power EMAs, ``sigma_rel`` 0.05 and 0.10.
EDM2_PROFILES = (0.05, 0.10)

#: The prune journal's file name, in the snapshot directory while a prune is in progress.
JOURNAL = "emakit-prune.json"

#: Snapshot counts :func:`plan` tries by default: a few to a few hundred.
DEFAULT_COUNTS = (4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512)


# --------------------------------------------------------------------------- fit errors


def fit_errors(snaps: Sequence, sigma_rels: Sequence[float], t: float) -> list[float]:
    """Relative profile error of each target ``sigma_rel`` at time ``t``, as ``posthoc.solve_coefficients`` finds it.

    ``snaps``: objects with ``.t`` and ``.gammas`` (``SnapshotInfo`` or synthetic), any order;
    those with ``0 < t_i <= t`` are used. ``inf`` for every target when none is used.
    """
    return _solve(snaps, sigma_rels, t)[0]


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    """What :func:`plan` found: ``best`` (fewest bytes meeting the target) and ``edm2`` (EDM2's profiles).

    ``edm2`` is the fewest snapshots of profiles (0.05, 0.10) that meet the target, or, when no
    searched interval does, the densest one tried (``meets=False``).
    """

    steps: int
    sigma_rel: tuple[float, float]
    max_fit_error: float
    at: tuple[float, ...]
    best: Layout
    edm2: Layout


def _check_range(where: str, sigma_rel) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in sigma_rel)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: sigma_rel must be a pair (low, high), got sigma_rel={sigma_rel!r}") from None
    if not (0 < lo <= hi < schedules.SIGMA_REL_MAX):
        raise ValueError(
            f"{where}: sigma_rel must be a pair 0 < low <= high < {schedules.SIGMA_REL_MAX:.4f}, got sigma_rel={sigma_rel!r}"
        )
    return lo, hi


def _check_fit(where: str, max_fit_error) -> float:
    if (
        isinstance(max_fit_error, bool)
        or not isinstance(max_fit_error, (int, float))
        or not (math.isfinite(max_fit_error) and max_fit_error > 0)
    ):
        raise ValueError(f"{where}: max_fit_error must be a finite number > 0, got max_fit_error={max_fit_error!r}")
    return float(max_fit_error)


def _check_plan(where: str, steps, sigma_rel, max_fit_error, at, candidates, max_profiles, counts, grid) -> tuple:
    """:func:`plan`'s arguments checked: ``(lo, hi, max_fit_error, at, candidates)``, ``at`` sorted and unique."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"{where}: steps must be an integer >= 2, got steps={steps!r}")
    lo, hi = _check_range(where, sigma_rel)
    max_fit_error = _check_fit(where, max_fit_error)
    at = (float(steps),) if at is None else tuple(at)
    if not at or not all(not isinstance(t, bool) and isinstance(t, (int, float)) and 0 < t <= steps for t in at):
        raise ValueError(f"{where}: at must be times in (0, steps={steps}], got at={at!r}")
    at = tuple(sorted({float(t) for t in at}))
    cands = _candidates(lo, hi) if candidates is None else sorted({float(c) for c in candidates})
    if not cands or not all(0 < c < schedules.SIGMA_REL_MAX for c in cands):
        raise ValueError(
            f"{where}: candidates must be sigma_rel values in (0, {schedules.SIGMA_REL_MAX:.4f}), "
            f"got candidates={candidates!r}"
        )
    if isinstance(max_profiles, bool) or not isinstance(max_profiles, int) or max_profiles < 1:
        raise ValueError(f"{where}: max_profiles must be an integer >= 1, got max_profiles={max_profiles!r}")
    if not counts or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in counts):
        raise ValueError(f"{where}: counts must be integers >= 1, got counts={counts!r}")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        raise ValueError(f"{where}: grid must be an integer >= 2, got grid={grid!r}")
    return lo, hi, max_fit_error, at, cands


def plan(
    steps: int,
    sigma_rel: tuple[float, float] = (0.03, 0.2),
    max_fit_error: float = FIT_ERROR_WARN,
    at: Sequence[float] | None = None,
    *,
    candidates: Sequence[float] | None = None,
    max_profiles: int = 4,
    counts: Sequence[int] = DEFAULT_COUNTS,
    grid: int = 32,
) -> Plan:
    """The tracked profiles and snapshot interval that meet a reconstruction target at the fewest bytes.

    Target: every ``sigma_rel`` in the range (a log grid of ``grid`` points) is reconstructed
    with relative profile error ``<= max_fit_error`` at every time in ``at`` (default: the end,
    ``steps``). Searched: sets of 1..``max_profiles`` profiles from ``candidates`` (default: a
    log grid through the range, one step beyond each end) plus EDM2's pair, each with a
    snapshot every ``ceil(steps / n)`` steps for ``n`` in ``counts``, one at the end and one at
    each time in ``at`` (a reconstruction at ``t`` needs a snapshot at ``t``).
    Cost: ``snapshots * profiles * 4`` bytes per parameter (fp32). Assumes the error falls as
    snapshots are added (bisects the counts). Raises ``ValueError`` when nothing searched meets it.

        p = plan(100_000, sigma_rel=(0.03, 0.2))
        PowerEMA(model, sigma_rels=p.best.sigma_rels)   # save_snapshot every p.best.interval steps
    """
    where = "plan"
    lo, hi, max_fit_error, at, cands = _check_plan(
        where, steps, sigma_rel, max_fit_error, at, candidates, max_profiles, counts, grid
    )
    intervals = sorted({max(1, math.ceil(steps / n)) for n in counts}, reverse=True)  # ascending snapshot count
    search = LayoutSearch(steps, at, _log_grid(lo, hi, grid), max_fit_error, intervals)
    with _one_thread():
        edm2 = search.fewest(EDM2_PROFILES, math.inf) or search.layout(EDM2_PROFILES, intervals[-1])
        best = search.best(cands, max_profiles, edm2)
    if best is None:
        raise ValueError(
            f"{where}: no searched layout reconstructs sigma_rel {lo:g}..{hi:g} within max_fit_error={max_fit_error:g} "
            f"(EDM2's profiles reach {edm2.fit_error:.2e} with {edm2.snapshots} snapshots); raise max_fit_error, "
            f"narrow sigma_rel, or allow more snapshots (counts=)"
        )
    return Plan(steps, (lo, hi), max_fit_error, at, best, edm2)


# --------------------------------------------------------------------------- prune


@dataclass(frozen=True)
class PruneReport:
    """What :func:`prune` removed (or, with ``dry_run``, would remove) and what the rest reconstructs.

    Fit errors are the worst relative profile errors over the range at the last snapshot's
    time; ``resumed`` lists files deleted to finish an interrupted prune's journal first.
    """

    directory: Path
    kept: tuple[str, ...]
    removed: tuple[str, ...]
    bytes_before: int
    bytes_after: int
    fit_error_before: float
    fit_error_after: float
    dry_run: bool
    resumed: tuple[str, ...] = ()
    rewritten: tuple[str, ...] = ()  # kept compact deltas rewritten as keyframes (their reference is removed)


def _report(directory: Path, infos: Sequence, gone: set[int], before: float, after: float, dry_run: bool, resumed):
    """The decision to remove the snapshots ``gone`` (indices into ``infos``) as a :class:`PruneReport`."""
    keep = [s for j, s in enumerate(infos) if j not in gone]
    removed = [s for j, s in enumerate(infos) if j in gone]
    rekey = _to_rekey(keep, removed)
    return PruneReport(
        directory=directory,
        kept=tuple(s.path.name for s in keep),
        removed=tuple(s.path.name for s in removed),
        bytes_before=sum(s.nbytes for s in infos),
        bytes_after=sum(_keyframe_bytes(s) if s in rekey else s.nbytes for s in keep),
        fit_error_before=before,
        fit_error_after=after,
        dry_run=dry_run,
        resumed=resumed,
        rewritten=tuple(s.path.name for s in rekey),
    )


@_collector.paused()
def prune(
    directory: str | os.PathLike,
    sigma_rel: tuple[float, float],
    max_fit_error: float = FIT_ERROR_WARN,
    dry_run: bool = False,
    *,
    grid: int = 24,
) -> PruneReport:
    """Delete the snapshots that no ``sigma_rel`` in the range needs, keeping every fit error ``<= max_fit_error``.

    Greedy: repeatedly drop the snapshot whose removal keeps the worst relative profile error
    (a log grid of ``grid`` points over the range, at the last snapshot's time) lowest, while
    it stays ``<= max_fit_error``; the last snapshot is never dropped. (Lazy: a candidate's
    error from an earlier round stands in until it is the best; removals rarely help others.)
    Beyond 32 snapshots it runs on the shortest forward selection (from the last, each step
    adding the snapshot that cuts the worst error most) that meets ``max_fit_error``; the
    others go, so time grows linearly with their number (``benchmarks/bench_prune_scale.py``),
    and ``fit_error_before`` is that of a selection run on to ``1e-4 * max_fit_error``.
    The whole decision is written to ``JOURNAL`` in the directory (atomically) before the first
    deletion; a call that finds a journal finishes it first, so a killed prune never leaves a
    needed snapshot missing. Compact snapshots: a kept delta whose reference is removed is
    first rewritten, losslessly, as a keyframe (:func:`emakit.snapshots.rewrite_as_keyframe`),
    so every kept snapshot decodes to exactly the values it did; ``bytes_after`` of a dry run
    counts those at their raw fp32 size (an upper bound), of a real one the files as written. ``dry_run`` deletes nothing. Reads headers only (also of sharded
    snapshots, whose headers are JSON), so it needs no ``trust``.

        report = prune("run/phema", sigma_rel=(0.05, 0.15), max_fit_error=1e-3)
    """
    where = "prune"
    lo, hi = _check_range(where, sigma_rel)
    max_fit_error = _check_fit(where, max_fit_error)
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        raise ValueError(f"{where}: grid must be an integer >= 2, got grid={grid!r}")
    directory = Path(directory)
    snapshot_paths(directory)  # SnapshotError when not a directory
    journal = directory / JOURNAL
    resumed, pending = resume(journal, dry_run)
    infos = [s for s in list_snapshots(directory) if s.path.name not in pending]
    if not infos:
        raise SnapshotError(f"{directory}: no snapshots left once the pending prune journal is finished")
    targets = _log_grid(lo, hi, grid)
    t = infos[-1].t
    with _one_thread():
        fit_from = _prune_candidates(infos, targets, t, max_fit_error)[1]  # all, or a subset that fits as well
        before, worst_s, _, _ = _worst([infos[i] for i in fit_from], targets, [t])
    if before > max_fit_error:
        raise ValueError(
            f"{where}: these snapshots already miss max_fit_error={max_fit_error:g}: relative profile error "
            f"{before:.2e} at sigma_rel={worst_s:.4g} (t={t:g}); nothing removed (narrow sigma_rel or raise "
            f"max_fit_error)"
        )
    with _one_thread():
        gone, after = _greedy(infos, targets, t, max_fit_error, before)
    report = _report(directory, infos, gone, before, after, dry_run, resumed)
    if dry_run or not report.removed:
        return report
    write_journal(journal, report, [lo, hi], max_fit_error)
    _finish(journal)
    return dataclasses.replace(report, bytes_after=sum(s.nbytes for s in list_snapshots(directory)))
