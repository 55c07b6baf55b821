"""The prune's decision and its journal: which snapshots go, written down before any goes.

Owns the greedy choice of the snapshots no ``sigma_rel`` in the range needs, the compact
deltas to rewrite as keyframes first (and a bound on their size), and the journal
protocol: the decision written atomically, then carried out one file at a time (newest
first), so that a killed prune leaves only unneeded files missing and the next call
finishes it.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from .._files.atomic import fsync_dir, temporary_name, write_then_rename
from .._files.limits import read_json
from ..snapshots import SnapshotError, rewrite_as_keyframe
from .fit import _prune_candidates, _worst


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
        record = read_json(journal)  # a regular file, capped in size and nesting
        names = list(record["delete"]) + list(record["keep"]) + list(record.get("rekey", []))
        if not set(record.get("rekey", [])) <= set(record["keep"]):
            raise ValueError("it rewrites snapshots it does not keep")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
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
    """Indices of ``infos`` to drop (never the last) and the worst fit error of the rest (lazy greedy).

    Among more than ``EXACT_SNAPSHOTS`` snapshots the greedy runs on the shortest forward
    selection that meets ``max_fit_error`` (:func:`emakit._planning.fit._prune_candidates`),
    and every other snapshot is dropped: so the work grows linearly with the number of
    snapshots, not with its fourth power (each removal tried is a solve over all that remain).
    """
    keep, _ = _prune_candidates(infos, targets, t, max_fit_error)
    outside = set(range(len(infos))) - set(keep)
    chosen = [infos[i] for i in keep]
    if outside:  # the others are gone already: start from the fit of these
        before = _worst(chosen, targets, [t])[0]
    gone, after = _lazy_greedy(chosen, targets, t, max_fit_error, before)
    return outside | {keep[i] for i in gone}, after


def _lazy_greedy(infos: Sequence, targets: Sequence[float], t: float, max_fit_error: float, before: float):
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
    """The kept compact deltas that need a removed snapshot (their reference, or the one before it that their
    prediction reads): rewritten as keyframes before any deletion."""
    gone = {s.t for s in removed}
    return [s for s in keep if getattr(s, "reference", None) in gone or getattr(s, "previous", None) in gone]


def _keyframe_bytes(info) -> int:
    """An upper bound on a snapshot's size once rewritten as a keyframe.

    Its file as it is (header, copies, the delta payloads) plus its averages in raw fp32 with
    deflate's worst-case overhead: the keyframe replaces the payloads by at most that.
    """
    tensors = [math.prod(info.shapes[n]) for n in info.averaged] * info.num_profiles
    return info.nbytes + sum(4 * n + 4 * n // 1000 + 64 for n in tensors)


def resume(journal: Path, dry_run: bool) -> tuple[tuple[str, ...], set[str]]:
    """``(names deleted now to finish an interrupted prune's journal, names a dry run counts as deleted)``."""
    resumed: tuple[str, ...] = ()
    pending: set[str] = set()
    if journal.exists():
        if dry_run:
            pending = set(_read_journal(journal)["delete"])
        else:
            resumed = _finish(journal)
    return resumed, pending


def write_journal(journal: Path, report, sigma_rel: list[float], max_fit_error: float) -> None:
    """Write the decision of ``report`` (a ``PruneReport``) to the journal, atomically, before any deletion."""
    record = {
        "format": "emakit.prune",
        "version": 1,
        "sigma_rel": sigma_rel,
        "max_fit_error": max_fit_error,
        "fit_error_before": report.fit_error_before,
        "fit_error_after": report.fit_error_after,
        "keep": list(report.kept),
        "delete": list(report.removed),
        "rekey": list(report.rewritten),
    }
    write_then_rename([(journal, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))])
