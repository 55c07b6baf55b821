"""Checking snapshots at rest for ``emakit verify``: every tensor read once, against what its header promises.

Owns the per-snapshot checks: each tensor has the shape and dtype its header says, averages
are floating, every floating tensor is finite, and the stored checksums match. Plain snapshot
files are read on the worker threads (:mod:`emakit._files.read_ahead`: each piece checked where
it is read, the next file's header read meanwhile); sharded and compact snapshots through
:func:`emakit.snapshots.open_tensors`. Also the wording helpers of ``emakit verify``'s lines.

    for check in check_snapshots(paths):
        problems += check.problems()                # [] when all is well
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

import torch
from torch import Tensor

from .. import snapshots
from .._engine.nonfinite import all_finite
from . import read_ahead as _read_ahead

#: Names listed in one problem line before "...".
_SHOWN = 3


def _first_line(error: BaseException, path: Path | None = None) -> str:
    """The first line of an error's message (without ``path``'s prefix); foreign errors keep their type name."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    text = lines[0].removeprefix(f"{path}: ") if path is not None else lines[0]
    return text if isinstance(error, snapshots.SnapshotError) else f"{type(error).__name__}: {text}"


def _named(path: Path, error: BaseException) -> str:
    """A problem line from an error whose message may already start with the path."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if text.startswith(str(path)) else f"{path}: {text}"


def _read_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged file can raise; torch's ``CheckpointException`` is a ``BaseException``."""
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:  # torch built without distributed
        return (Exception,)
    return (Exception, CheckpointException)


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def check_snapshots(paths: list[Path]) -> list[_SnapshotCheck]:
    """Read and check every tensor of the snapshots ``paths``: those of plain files on the worker threads, the
    others through their readers, one at a time. Every header is read first: parsed while the workers read, they
    made the workers wait for the GIL after each read (verify 10-15% slower)."""
    layouts: dict[Path, dict] = {}
    checks = [_SnapshotCheck(path) for path in paths]
    owners: list[tuple[_SnapshotCheck, int]] = []  # the check and its error slot of every group

    def groups():
        for check in checks:
            if check.info is None:
                continue
            if not _read_ahead.supports(check.info):
                check.read_with_reader()
                continue
            try:
                chunks = _read_ahead.in_chunks(check.info, check.order, layouts)
            except snapshots.SnapshotError as e:
                check.errors.append(e)
                continue
            for keys in chunks:
                owners.append((check, len(check.errors)))
                check.errors.append(None)
                yield [(check.info, key) for key in keys], check.read

    with contextlib.closing(_read_ahead.run_groups(groups(), layouts)) as done:
        for n, error in done:
            check, slot = owners[n]
            check.errors[slot] = error
    return checks


class _SnapshotCheck:
    """What one snapshot promises (its header) and what its tensors hold, checked piece by piece."""

    def __init__(self, path: Path) -> None:
        self.path, self.errors = path, []  # errors: one slot per group read on the workers
        self.found: dict[str, list[str]] = {}  # key -> its problems
        self.nonfinite: set[str] = set()
        self.opened: str | None = None  # the problem opening the header or the tensors
        try:
            self.info = snapshots.read_info(path)
        except snapshots.SnapshotError as e:
            self.info, self.opened = None, _named(path, e)
            return
        info = self.info
        self.order = [f"avg.{j}/{n}" for j in range(info.num_profiles) for n in info.averaged]
        self.order += [f"copy/{n}" for n in info.copied] + [f"static/{n}" for n in info.static]

    def read(self, info, pieces: list, data: Tensor) -> None:
        """Check the tensors of one read (a :data:`~emakit._files.read_ahead.PieceFn`; runs on a worker thread)."""
        for piece in pieces:
            if piece.start == 0:
                self._promised(piece.key, piece.shape, piece.dtype)
        floats = [p for p in pieces if p.dtype.is_floating_point]
        if floats and all(p.dtype == floats[0].dtype and p.at == q.at + q.nbytes for q, p in zip(floats, floats[1:])):
            whole = floats[0]._replace(nbytes=floats[-1].at + floats[-1].nbytes - floats[0].at)
            if all_finite(whole.of(data)):  # one sum for the whole read, the usual case
                return
        for piece in floats:
            if not all_finite(piece.of(data)):
                self.nonfinite.add(piece.key)

    def _promised(self, key: str, shape: tuple, dtype: torch.dtype) -> None:
        """Note where tensor ``key`` differs from what the header promises."""
        name = key.split("/", 1)[1]
        if tuple(shape) != tuple(self.info.shapes[name]):
            self.found.setdefault(key, []).append(
                f"{self.path}: {key!r} has shape {tuple(shape)}, the header says {self.info.shapes[name]}"
            )
        if key.startswith("avg.") and dtype != self.info.dtype:
            self.found.setdefault(key, []).append(f"{self.path}: {key!r} is {dtype}, the header says {self.info.dtype}")

    def read_with_reader(self) -> None:
        """Check every tensor through the snapshot's reader (sharded and compact snapshots), one at a time."""
        self.found.clear()
        self.nonfinite.clear()
        self.errors = []
        trust = {"trust": True} if "trust" in inspect.signature(snapshots.open_tensors).parameters else {}
        try:
            reader = snapshots.open_tensors(self.info, self.order, **trust)  # the caller vouched for DCP folders
        except _read_errors() as e:
            self.opened = f"{self.path}: cannot open the tensors: {_first_line(e, self.path)}"
            return
        try:
            for key in self.order:
                value = reader.get(key)
                self._promised(key, value.shape, value.dtype)
                if value.is_floating_point() and not all_finite(value):
                    self.nonfinite.add(key)
        except _read_errors() as e:
            self.errors.append(e)
        finally:
            reader.close()

    def problems(self) -> list[str]:
        if self.info is None:
            return [self.opened]
        lines = [] if self.info.dtype.is_floating_point else [
            f"{self.path}: averages stored as {self.info.dtype}, expected a floating dtype"
        ]  # fmt: skip
        if self.opened is not None:
            return [*lines, self.opened]
        error = next((e for e in self.errors if e is not None), None)  # the first in file order
        if error is not None:
            lines.append(f"{self.path}: cannot read the tensors: {_first_line(error, self.path)}")
        lines += [line for key in self.order for line in self.found.get(key, [])]
        if self.nonfinite:
            keys = [k for k in self.order if k in self.nonfinite]
            lines.append(f"{self.path}: {len(keys)} tensor(s) hold NaN or inf: {_names(keys)}")
        return lines
