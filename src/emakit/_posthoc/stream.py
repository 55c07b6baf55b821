"""The streaming weighted sum under post-hoc reconstruction: ``sum_i x_i * snapshot_i``.

Owns reading the snapshot files for :func:`emakit.posthoc.reconstruct`, each once and one
tensor at a time, accumulating every requested length's weighted sum (in fp32 at least),
reading the copied and static tensors of the latest snapshot, the output dtype, and the
progress bar (tqdm, when installed). Gets its weights from the solve and its readers from
``reconstruct``: it neither solves nor chooses how a file is opened.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Sequence

import torch
from torch import Tensor

from .._engine.nonfinite import all_finite as _finite
from .._files import read_ahead as _read_ahead
from ..snapshots import SnapshotError, SnapshotInfo


def _weighted_sums(
    solutions: Sequence, reader_for, bar, accumulate: torch.dtype = torch.float32
) -> list[dict[str, Tensor]]:
    """``sum_i x_i * snapshot_i`` for every solution, reading each snapshot file once, tensor by tensor.

    Plain single files (``reader_for.whole_files``) are summed on the worker threads, a few
    MiB of the model at a time, each piece read, checksummed and added by one core while it
    is in cache (:class:`_Sums`); other snapshots file by file through
    ``reader_for``. NaN or Inf in a snapshot makes the sums non-finite: checked once per sum
    (on the workers, as each group's sums are done and in cache), and only then are the files
    searched for the tensor to name.
    """
    used = solutions[0].snapshots
    # Accumulate in fp32 at least (snapshots may be fp16/bf16), cast at the end.
    if not (isinstance(accumulate, torch.dtype) and accumulate.is_floating_point):
        raise ValueError(f"reconstruct: accumulate must be a floating torch.dtype, got accumulate={accumulate!r}")
    acc_dtype = torch.promote_types(torch.promote_types(torch.float32, accumulate), used[-1].dtype)
    names = used[-1].averaged
    # (snapshot index, key) -> the (profile, name) it is the average of; a static tensor (frozen at that
    # time) is every profile's average, read once.
    plan: dict[tuple[int, str], list[tuple[int, str]]] = {}
    for i, info in enumerate(used):
        key_of = _keys(info)
        for j in range(info.num_profiles):
            for name in names:
                plan.setdefault((i, key_of(j, name)), []).append((j, name))
    if getattr(reader_for, "whole_files", False) and all(_read_ahead.supports(info) for info in used):
        layouts: dict = {}
        total = _Sums(solutions, plan, acc_dtype, layouts)
        groups = [(items, total.adder(n), total.finisher(n)) for n, items in enumerate(total.items)]
        with contextlib.closing(_read_ahead.run_groups(groups, layouts)) as done:
            for n, error in done:
                if error is not None:
                    raise error
                bar.update(total.counts[n])
        sums, finite = total.result(), total.finite
    else:  # tensor by tensor; a sharded snapshot's reader may give this rank's part (another shape)
        sums = [{} for _ in solutions]
        terms = _Terms(solutions, sums, acc_dtype)
        for i, key, value in _values(used, plan, reader_for):
            for j, name in plan[(i, key)]:
                terms.add(i, j, name, value)
                bar.update(1)
        terms.flush()
        finite = all(_finite(v) for v in sums[0].values())
    if not finite:
        _name_nonfinite(used, names, reader_for)
    return sums


class _Sums:
    """The weighted sums, a group of names at a time: each group one flat tensor per solution, summed by one thread.

    A group is about :data:`~emakit._files.read_ahead.CHUNK` bytes of the model (one name at
    least), its names side by side in the order their bytes lie in the latest file (safetensors
    sorts keys by name: ``blocks.10`` before ``blocks.2``), so that one profile of a group is
    one read of each file, added in one operation; a worker adding one group from every file
    in turn finds its sums in cache. The flat tensors of a group of several names are scratch,
    reused by the next group (fresh memory costs a page fault every 4 KiB); :meth:`finisher`
    copies them into each name's own tensor. A group of one name sums into its tensor directly.
    """

    def __init__(self, solutions: Sequence, plan: dict, acc_dtype: torch.dtype, layouts: dict) -> None:
        self.solutions, self.acc_dtype = solutions, acc_dtype
        opened: set[str] = set()  # the first term of each sum is written, not added to zeros
        self.plan = {item: [(j, name, name not in opened and not opened.add(name)) for j, name in targets]
                     for item, targets in plan.items()}  # fmt: skip
        self.used = used = solutions[0].snapshots
        self.index = {id(info): i for i, info in enumerate(used)}
        latest = used[-1]
        offset = {key: entry[2] for key, entry in _read_ahead.layout(latest, layouts).items()}
        end = max(offset.values(), default=0) + 1
        order = sorted(latest.averaged, key=lambda name: offset.get(f"avg.0/{name}", end))
        self.group_of: dict[str, int] = {}
        self.offset: dict[str, int] = {}  # a name's first element in its group
        self.sizes: list[int] = []  # elements per group
        self.names_of: dict[int, list[str]] = {}
        size = 0
        for name in order:
            numel = math.prod(latest.shapes[name])
            if not self.sizes or (size and size + numel * latest.dtype.itemsize > _read_ahead.CHUNK):
                self.sizes.append(0)
                size = 0
            self.group_of[name], self.offset[name] = len(self.sizes) - 1, self.sizes[-1]
            self.names_of.setdefault(len(self.sizes) - 1, []).append(name)
            self.sizes[-1] += numel
            size += numel * latest.dtype.itemsize
        self.items: list[list[tuple[SnapshotInfo, str]]] = [[] for _ in self.sizes]
        self.counts = [0] * len(self.sizes)  # (profile, name) terms per group, for the progress bar

        def place(item: tuple) -> tuple[int, int]:  # each file's keys in the latest's order: neighbours in one read
            (i, _), ((j, name), *_) = item
            return i, offset.get(f"avg.{j}/{name}", end)

        for (i, key), targets in sorted(plan.items(), key=place):
            n = self.group_of[targets[0][1]]
            self.items[n].append((used[i], key))
            self.counts[n] += len(targets)
        self.flats: list[list[Tensor] | None] = [None] * len(self.sizes)
        # name -> its sum of every solution: allocated here, on the calling thread (whose allocator keeps freed
        # memory mapped, where a worker's gives it back: 5-10k page faults per 40 MB), filled by its group
        self.parts: dict[str, list[Tensor]] = {
            name: [torch.empty(latest.shapes[name], dtype=acc_dtype) for _ in solutions] for name in latest.averaged
        }
        self._scratch: list[Tensor] = []  # flat tensors of finished groups, to sum the next ones into
        self._scratch_size = max((self.sizes[n] for n, names in self.names_of.items() if len(names) > 1), default=0)
        self._lock = threading.Lock()
        self.finite = True  # whether every finished group's first sums are finite (checked while in cache)

    def adder(self, n: int):
        """The :data:`~emakit._files.read_ahead.PieceFn` adding reads into group ``n``'s sums."""

        def add(info: SnapshotInfo, pieces: list, data: Tensor) -> None:
            if self.flats[n] is None:
                self.flats[n] = self._flats(n)
            i = self.index[id(info)]
            for span, j, first in self._spans(i, pieces):
                x = span.of(data).to(self.acc_dtype)
                for sol, flat in zip(self.solutions, self.flats[n]):
                    out = flat[span.start : span.start + x.numel()]
                    if first:  # the first term of these sums: written, no zeros to add to
                        torch.mul(x, sol.weights[i][j], out=out)
                    else:
                        out.add_(x, alpha=sol.weights[i][j])

        return add

    def _spans(self, i: int, pieces: list) -> list[tuple]:
        """``(span, profile, first)`` covering ``pieces`` of snapshot ``i``: a span is a Piece whose ``start`` is
        its first element in the group's sums; neighbours in the read and in the sums merge into one."""
        latest, spans = self.used[-1], []
        for piece in pieces:
            for j, name, first in self.plan[(i, piece.key)]:
                if tuple(piece.shape) != tuple(latest.shapes[name]):
                    raise SnapshotError(
                        f"{self.used[i].path}: tensor {piece.key!r} has shape {tuple(piece.shape)}, but "
                        f"{latest.path.name} averages {name!r} with shape {tuple(latest.shapes[name])} "
                        f"(snapshots of different models?)"
                    )
                at = self.offset[name] + piece.start
                if spans:
                    last, lj, lfirst = spans[-1]
                    if (lj, lfirst, last.dtype) == (j, first, piece.dtype) and last.at + last.nbytes == piece.at and \
                            last.start + last.nbytes // last.dtype.itemsize == at and piece.at % piece.dtype.itemsize == 0:
                        spans[-1] = (last._replace(nbytes=last.nbytes + piece.nbytes), j, first)
                        continue
                spans.append((piece._replace(start=at), j, first))
        return spans

    def _flats(self, n: int) -> list[Tensor]:
        """Group ``n``'s flat sums, one per solution: scratch, or the name's own tensors for a group of one."""
        if len(self.names_of[n]) == 1:
            return [part.view(-1) for part in self.parts[self.names_of[n][0]]]
        with self._lock:
            free, self._scratch = self._scratch[: len(self.solutions)], self._scratch[len(self.solutions) :]
        return free + [torch.empty(self._scratch_size, dtype=self.acc_dtype) for _ in self.solutions[len(free) :]]

    def finisher(self, n: int):
        """What runs after group ``n``'s last piece: its sums into each name's own tensor."""

        def finish() -> None:
            latest, flats, names = self.used[-1], self.flats[n], self.names_of[n]
            if not _finite(flats[0][: self.sizes[n]]):
                self.finite = False
            if len(names) == 1:
                return
            for name in names:
                at, numel = self.offset[name], math.prod(latest.shapes[name])
                for part, flat in zip(self.parts[name], flats):
                    part.view(-1).copy_(flat[at : at + numel])
            with self._lock:
                self._scratch += flats
            self.flats[n] = None

        return finish

    def result(self) -> list[dict[str, Tensor]]:
        """Each solution's sums by name, each in memory of its own."""
        return [{name: self.parts[name][s] for name in self.used[-1].averaged} for s in range(len(self.solutions))]


class _Terms:
    """Terms of the weighted sums, added a run at a time: tensors read one after another with the same weights (one
    file, one profile) take one fused add per solution (``torch._foreach_add_``, a tensor at a time inside: the
    same bits) instead of an op per tensor and solution, which a model of thousands of small tensors notices."""

    def __init__(self, solutions: Sequence, sums: list[dict[str, Tensor]], acc_dtype: torch.dtype) -> None:
        self.solutions, self.sums, self.acc_dtype = solutions, sums, acc_dtype
        self.weights: tuple[int, int] | None = None  # (snapshot, profile) of the run
        self.names: list[str] = []
        self.values: list[Tensor] = []
        self.nbytes = 0

    def add(self, i: int, j: int, name: str, value: Tensor) -> None:
        if (i, j) != self.weights or self.nbytes > _RUN_BYTES:
            self.flush()
            self.weights = (i, j)
        self.names.append(name)
        self.values.append(value)
        self.nbytes += value.nbytes

    def flush(self) -> None:
        if not self.values:
            return
        i, j = self.weights
        for sol, acc in zip(self.solutions, self.sums):
            w, added = sol.weights[i][j], [(acc[n], v) for n, v in zip(self.names, self.values) if n in acc]
            if added:  # in place; values of another dtype are promoted to the sums' (fp32 at least)
                torch._foreach_add_([a for a, _ in added], [v for _, v in added], alpha=w)
            for name, value in zip(self.names, self.values):
                if name not in acc:  # the first term of this sum: written, no zeros to add to
                    acc[name] = value.to(self.acc_dtype) * w
        self.names, self.values, self.nbytes = [], [], 0


#: Bytes of read tensors a run of :class:`_Terms` holds before it adds them.
_RUN_BYTES = 64 << 20


def _values(used: Sequence[SnapshotInfo], plan: dict, reader_for):
    """``(snapshot index, key, tensor)`` of every key of ``plan``, file by file."""
    by_file: dict[int, list[str]] = {}
    for i, key in plan:
        by_file.setdefault(i, []).append(key)
    for i, keys in by_file.items():
        for key, value in _tensors(used[i], reader_for, keys):
            yield i, key, value


def _tensors(info: SnapshotInfo, reader_for, keys: list[str]):
    """``(key, tensor)`` of ``keys`` of one snapshot, in order; read errors name the file."""
    reader = reader_for(info, keys)
    try:
        for key in keys:
            yield key, reader.get(key)
    except SnapshotError:
        raise
    except Exception as e:
        raise SnapshotError(f"{info.path}: could not read the snapshot data (truncated or corrupted?): {e}") from e
    finally:
        reader.close()


def _name_nonfinite(used: Sequence[SnapshotInfo], names: Sequence[str], reader_for) -> None:
    """Raise naming the first snapshot tensor that holds NaN or Inf (none: the sum overflowed, left as it is)."""
    for info in used:
        key_of = _keys(info)
        keys = list(dict.fromkeys(key_of(j, n) for j in range(info.num_profiles) for n in names))
        for key, value in _tensors(info, reader_for, keys):
            if not bool(torch.isfinite(value).all()):
                raise SnapshotError(f"{info.path}: tensor {key!r} holds NaN or Inf; it cannot be averaged")


def _keys(info: SnapshotInfo):
    """``key_of(j, name)``: where snapshot ``info`` holds profile ``j``'s average of ``name`` (names looked up in
    sets: a model of 2000 tensors asks 2000 times per file and profile)."""
    averaged, static = frozenset(info.averaged), frozenset(info.static)

    def key_of(j: int, name: str) -> str:
        if name in averaged:
            return f"avg.{j}/{name}"
        if name in static:
            return f"static/{name}"
        raise SnapshotError(
            f"{info.path}: holds no average of {name!r}, which later snapshots average (it was frozen at "
            f"t={info.t:g} and saved with static=False); reconstruct at a t whose snapshots all average it, or "
            f"save snapshots with static=True"
        )

    return key_of


def _check_finite(info: SnapshotInfo, key: str, x: Tensor, why: str) -> None:
    """Raise if ``x`` holds NaN or Inf: a sum is NaN/Inf when an element is (30x faster than ``isfinite``), and
    a sum that overflowed while every element is finite is confirmed element by element."""
    if not _finite(x):
        raise SnapshotError(f"{info.path}: tensor {key!r} holds NaN or Inf; {why}")


def _read_extras(latest: SnapshotInfo, reader_for) -> dict[str, Tensor]:
    """The copied and stored static tensors of the latest snapshot used, by name."""
    extras: dict[str, Tensor] = {}
    order = [f"copy/{n}" for n in latest.copied] + [f"static/{n}" for n in latest.static]
    reader = reader_for(latest, order)
    try:
        for key in order:
            extras[key.split("/", 1)[1]] = value = reader.get(key)
            if value.is_floating_point():  # copied and frozen tensors are checked like averages
                _check_finite(latest, key, value, "it would be returned as it is")
    except SnapshotError:
        raise
    except Exception as e:
        raise SnapshotError(f"{latest.path}: could not read the snapshot data (truncated or corrupted?): {e}") from e
    finally:
        reader.close()
    return extras


def _out_dtype(dtype: torch.dtype | str) -> torch.dtype | None:
    if dtype == "model":
        return None
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise ValueError(f"dtype must be 'model' or a floating dtype name such as 'float32', got {dtype!r}")
        return resolved
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise ValueError(f"dtype must be 'model' or a floating torch.dtype, got {dtype!r}")


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="reconstruct", unit="tensor", leave=False)
