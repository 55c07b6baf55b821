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

import contextlib
import dataclasses
import heapq
import itertools
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from . import schedules
from ._files.atomic import fsync_dir, temporary_name, write_then_rename
from ._posthoc.profiles import power_inner
from .posthoc import FIT_ERROR_WARN, _normal_equations, list_snapshots
from .snapshots import SnapshotError, rewrite_as_keyframe, snapshot_paths

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

_BYTES_FP32 = 4


class _Snap(NamedTuple):
    """What the normal equations read of a snapshot: its time and its profiles' gammas."""

    t: float
    gammas: tuple[float, ...]


# --------------------------------------------------------------------------- fit errors


def fit_errors(snaps: Sequence, sigma_rels: Sequence[float], t: float) -> list[float]:
    """Relative profile error of each target ``sigma_rel`` at time ``t``, as ``posthoc.solve_coefficients`` finds it.

    ``snaps``: objects with ``.t`` and ``.gammas`` (``SnapshotInfo`` or synthetic), any order;
    those with ``0 < t_i <= t`` are used. ``inf`` for every target when none is used.
    """
    return _solve(snaps, sigma_rels, t)[0]


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


# --------------------------------------------------------------------------- plan


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


def _times(steps: int, interval: int, at: Sequence[float] = ()) -> list[float]:
    """Snapshot times when saving every ``interval`` steps, at the end, and at the times in ``at``."""
    return sorted({float(k) for k in range(interval, steps, interval)} | {float(steps)} | {float(t) for t in at})


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


def _candidates(lo: float, hi: float) -> list[float]:
    """Profiles to combine: a log grid through ``lo`` and ``hi`` (6 points), one step below, one above."""
    ratio = (hi / lo) ** (1 / 5) if hi > lo else 1.5
    values = {float(f"{lo * ratio**i:.3g}") for i in range(-1, 7)}
    return sorted(v for v in values if v < schedules.SIGMA_REL_MAX * 0.97)


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
    targets = _log_grid(lo, hi, grid)
    intervals = sorted({max(1, math.ceil(steps / n)) for n in counts}, reverse=True)  # ascending snapshot count

    def layout(profiles: tuple[float, ...], interval: int) -> Layout:
        gammas = tuple(schedules.sigma_rel_to_gamma(s) for s in profiles)
        times = _times(steps, interval, at)
        error, _, _, gain = _worst([_Snap(t, gammas) for t in times], targets, at)
        nbytes = len(times) * len(profiles) * _BYTES_FP32
        return Layout(profiles, interval, len(times), nbytes, error, gain, error <= max_fit_error)

    def fewest(profiles: tuple[float, ...], budget: float) -> Layout | None:
        """The sparsest interval meeting the target within ``budget`` bytes (bisection), or None."""
        allowed = [k for k in intervals if len(_times(steps, k, at)) * len(profiles) * _BYTES_FP32 <= budget]
        if not allowed:
            return None
        top = layout(profiles, allowed[-1])
        if not top.meets:
            return None
        lo_i, hi_i, found = 0, len(allowed) - 1, top  # allowed[hi_i] meets
        while lo_i < hi_i:
            mid = (lo_i + hi_i) // 2
            candidate = layout(profiles, allowed[mid])
            if candidate.meets:
                hi_i, found = mid, candidate
            else:
                lo_i = mid + 1
        return found

    with _one_thread():
        edm2 = fewest(EDM2_PROFILES, math.inf) or layout(EDM2_PROFILES, intervals[-1])
        best = edm2 if edm2.meets else None
        sets = [c for p in range(1, max_profiles + 1) for c in itertools.combinations(cands, p)]
        for profiles in sets:
            budget = best.bytes_per_parameter if best is not None else math.inf
            found = fewest(tuple(profiles), budget)
            if found is not None and (
                best is None
                or (found.bytes_per_parameter, found.fit_error) < (best.bytes_per_parameter, best.fit_error)
            ):
                best = found
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


def _remove(path: Path) -> None:
    """Delete one snapshot (a seam: tests replace it to simulate a kill).

    A sharded snapshot (a directory) is first renamed to a hidden temporary name, so it stops
    being listed at once; a kill during the removal leaves that hidden name, which the next
    write into the directory reclaims.
    """
    if path.is_dir():
        hidden = temporary_name(path)
        os.rename(path, hidden)
        shutil.rmtree(hidden, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _read_journal(journal: Path) -> dict:
    try:
        record = json.loads(journal.read_text())
        names = list(record["delete"]) + list(record["keep"]) + list(record.get("rekey", []))
        if not set(record.get("rekey", [])) <= set(record["keep"]):
            raise ValueError("it rewrites snapshots it does not keep")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SnapshotError(f"{journal}: not a readable prune journal ({e}); remove it to prune again") from None
    bad = [n for n in names if not (isinstance(n, str) and Path(n).name == n and n.startswith("phema-"))]
    if record.get("format") != "emakit.prune" or bad:
        raise SnapshotError(f"{journal}: not an emakit prune journal (format or file names); remove it to prune again")
    return record


def _finish(journal: Path) -> tuple[str, ...]:
    """Do what the journal says: rewrite the listed deltas as keyframes, delete one file at a time, then the journal.

    Returns the names deleted now.
    """
    record = _read_journal(journal)
    directory = journal.parent
    missing = [n for n in record["keep"] if not (directory / n).exists()]
    if missing:
        raise SnapshotError(
            f"{journal}: the prune it records keeps {directory / missing[0]}, which is missing; the decision no "
            f"longer holds, so nothing more is deleted (remove the journal to prune again)"
        )
    for name in record.get("rekey", []):  # first: while every reference still exists
        rewrite_as_keyframe(directory / name)  # (a no-op for one rewritten before a kill)
    deleted = []
    # Newest first: a compact delta refers only to older snapshots, so no file left behind by a
    # kill refers to one already deleted (kept deltas were rewritten above).
    for name in reversed(record["delete"]):
        path = directory / name
        if path.exists():
            _remove(path)
            deleted.append(name)
    fsync_dir(directory)
    journal.unlink(missing_ok=True)
    fsync_dir(directory)
    return tuple(deleted)


def _greedy(infos: Sequence, targets: Sequence[float], t: float, max_fit_error: float, before: float):
    """Indices of ``infos`` to drop (never the last) and the worst fit error of the rest (lazy greedy)."""
    gone: set[int] = set()
    after = before
    heap = [(_worst(infos[:i] + infos[i + 1 :], targets, [t])[0], i) for i in range(len(infos) - 1)]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        rest = [s for j, s in enumerate(infos) if j not in gone and j != i]
        fresh = _worst(rest, targets, [t])[0]
        if heap and fresh > heap[0][0]:
            heapq.heappush(heap, (fresh, i))  # its error from an earlier round was stale: re-rank it
            continue
        if fresh > max_fit_error:
            break
        gone.add(i)
        after = fresh
    return gone, after


def _to_rekey(keep: Sequence, removed: Sequence) -> list:
    """The kept compact deltas whose reference is removed: rewritten as keyframes before any deletion."""
    gone = {s.t for s in removed}
    return [s for s in keep if getattr(s, "reference", None) in gone]


def _keyframe_bytes(info) -> int:
    """An upper bound on a snapshot's size once rewritten as a keyframe.

    Its file as it is (header, copies, the delta payloads) plus its averages in raw fp32 with
    deflate's worst-case overhead: the keyframe replaces the payloads by at most that.
    """
    tensors = [math.prod(info.shapes[n]) for n in info.averaged] * info.num_profiles
    return info.nbytes + sum(4 * n + 4 * n // 1000 + 64 for n in tensors)


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
    resumed: tuple[str, ...] = ()
    pending: set[str] = set()
    if journal.exists():
        if dry_run:
            pending = set(_read_journal(journal)["delete"])
        else:
            resumed = _finish(journal)
    infos = [s for s in list_snapshots(directory) if s.path.name not in pending]
    if not infos:
        raise SnapshotError(f"{directory}: no snapshots left once the pending prune journal is finished")
    targets = _log_grid(lo, hi, grid)
    t = infos[-1].t
    with _one_thread():
        before, worst_s, _, _ = _worst(infos, targets, [t])
    if before > max_fit_error:
        raise ValueError(
            f"{where}: these snapshots already miss max_fit_error={max_fit_error:g}: relative profile error "
            f"{before:.2e} at sigma_rel={worst_s:.4g} (t={t:g}); nothing removed (narrow sigma_rel or raise "
            f"max_fit_error)"
        )
    with _one_thread():
        gone, after = _greedy(infos, targets, t, max_fit_error, before)
    keep = [s for j, s in enumerate(infos) if j not in gone]
    removed = [s for j, s in enumerate(infos) if j in gone]
    rekey = _to_rekey(keep, removed)
    report = PruneReport(
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
    if dry_run or not removed:
        return report
    record = {
        "format": "emakit.prune",
        "version": 1,
        "sigma_rel": [lo, hi],
        "max_fit_error": max_fit_error,
        "fit_error_before": before,
        "fit_error_after": after,
        "keep": list(report.kept),
        "delete": list(report.removed),
        "rekey": list(report.rewritten),
    }
    write_then_rename([(journal, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))])
    _finish(journal)
    return dataclasses.replace(report, bytes_after=sum(s.nbytes for s in list_snapshots(directory)))
