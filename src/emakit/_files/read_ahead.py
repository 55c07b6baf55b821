"""Reading plain snapshot files on worker threads, each checked piece handed to the caller's function there.

Owns the fast path under reconstruction and ``emakit verify``: given groups of ``(snapshot,
key)`` pairs from any number of plain (not compact) ``phema-<t>.safetensors`` files,
:func:`run_groups` runs every group on a worker thread (the checksum threads), reading its
tensors with ``os.preadv`` into a buffer of the thread's own (:data:`CHUNK` bytes: tensors
side by side in a file in one read, a larger tensor in pieces), taking each checksum while the
bytes are still in that core's cache, and calling the group's function on each piece there (a
weighted sum, a finiteness test), so the bytes are touched once by one core. The function
gets every read whole (the tensors side by side in it, each already checked), so its work can
be one operation per read instead of one per tensor. Groups run concurrently, the items of one
group in their order; a group's function must touch only state of its own group. Offsets come
from each file's safetensors header, checked against the file's size and the tensors' shapes
and dtypes.

    def add(info, pieces, data):                    # data: the bytes read; pieces: the tensors in it
        for piece in pieces:
            x = piece.of(data)                      # flat: elements piece.start.. of piece.key
    for n, error in run_groups([(items, add), ...]):     # each group as it finishes
        if error is not None:
            raise error
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from . import checksums as _checksums
from .header import _SAFETENSORS_DTYPES, SnapshotError, SnapshotInfo

#: Bytes read in one call at most, and the size of each worker's buffer: small enough that a
#: checksum and the caller's work on the bytes find them in cache (1-4 MiB measured alike here;
#: 16 MiB read 30% slower).
CHUNK = 4 << 20
#: Bytes of one file per group that :func:`in_chunks` cuts (a few reads: fewer hand-overs between threads).
_GROUP = 4 * CHUNK
#: Files kept open at once; past that each read opens its file itself.
_OPEN_FILES = 256
#: Largest safetensors header read (safetensors' own limit is 100 MB).
_MAX_HEADER = 100 << 20


class Piece(NamedTuple):
    """Elements ``start:`` of tensor ``key`` (of ``dtype`` and ``shape``), held by bytes ``at:at + nbytes`` of a read."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    at: int
    nbytes: int

    def of(self, data: Tensor) -> Tensor:
        """The piece as a flat tensor of its dtype, from the read's bytes ``data`` (copied where misaligned)."""
        raw = data[self.at : self.at + self.nbytes]
        return (raw if self.at % self.dtype.itemsize == 0 else raw.clone()).view(self.dtype)


#: ``fn(info, pieces, data)``: ``data`` is the flat uint8 tensor of one read of ``info``'s file (valid only
#: during the call), ``pieces`` the tensors (or the part of one large tensor) it holds, in file order.
PieceFn = Callable[[SnapshotInfo, list[Piece], Tensor], None]


def supports(info: SnapshotInfo) -> bool:
    """Whether :func:`run_groups` reads this snapshot: a single file whose tensors are stored as they are."""
    return not info.sharded and info.encoding == "fp32"


def parse_layout(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """``key -> (dtype, shape, file offset, bytes)`` of a safetensors file, checked against its size."""
    return parse_header(path)[1]


def parse_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]]:
    """A safetensors file's metadata (``{}`` where it has none) and :func:`parse_layout`'s table, from one parse of
    its header: the tensors checked against the file's size (lying inside it, of the size their shape needs, not
    overlapping), the metadata a mapping of strings; :class:`SnapshotError` naming the file where not."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or length > min(size - 8, _MAX_HEADER):
                raise ValueError(f"header length {length} in a file of {size} bytes")
            header = json.loads(f.read(length))
        table, base, metadata = {}, 8 + length, header.pop("__metadata__", None) or {}
        if not all(type(k) is str and type(v) is str for k, v in metadata.items()):
            raise ValueError("its metadata is not a mapping of strings")
        for key, entry in header.items():  # (a model of thousands of tensors: kept to a few steps per tensor)
            dtype, shape = _SAFETENSORS_DTYPES[entry["dtype"]], tuple(map(int, entry["shape"]))
            start, end = map(int, entry["data_offsets"])
            nbytes = math.prod(shape) * dtype.itemsize
            if min(shape, default=0) < 0 or not 0 <= start <= end == start + nbytes or base + end > size:
                raise ValueError(f"tensor {key!r} lies outside the file or does not match its shape")
            table[key] = (dtype, shape, base + start, nbytes)
        spans = sorted((entry[2], entry[3]) for entry in table.values())
        if any(a + n > b for (a, n), (b, _) in zip(spans, spans[1:])):
            raise ValueError("tensors overlap")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise SnapshotError(f"{path}: not a readable safetensors file (truncated or corrupted?): {e}") from None
    return metadata, table


def run_groups(groups: Iterable[tuple], layouts: dict[Path, dict] | None = None) -> Iterator[tuple[int, Exception | None]]:
    """Run each group's function on every piece of its items on the worker threads; yield ``(index, error)`` of
    each group as it finishes (in the order they finish; ``error`` None when it went through).

    A group is ``(items, fn)`` or ``(items, fn, finish)``: ``items`` are ``(info, key)`` pairs,
    ``fn`` a :data:`PieceFn`, ``finish()`` runs on the same thread after the group's last
    piece. Each group is handed to the workers as soon as ``groups`` gives it, so the caller
    may build the next ones (read headers) while the first are read.

    Every ``info`` must be a snapshot :func:`supports` reads. Tensors of up to :data:`CHUNK`
    bytes come whole, side by side in one read of up to that size, each checked against its
    checksum before the function sees it; a larger one comes alone, in pieces of at most that
    size, in order, and its checksum is known only after the last: where a group has an
    error, whatever its function built must be dropped. A group's error stops that group
    only: a :class:`SnapshotError` naming the file (not a safetensors file, a tensor it does
    not hold, a short file, a checksum mismatch), or what its function raised. Stopping the
    iteration early cancels the groups not started and waits for the running ones.
    ``layouts``: the files' tables read before (:func:`in_chunks`), filled in as the workers
    read more. Each worker runs torch with one intra-op thread: the workers are the
    parallelism (two of them on two cores would otherwise run four threads).
    """
    files = _Files({} if layouts is None else layouts)
    futures: dict[concurrent.futures.Future, int] = {}
    try:
        pool = _checksums.pool()
        for n, (items, fn, *finish) in enumerate(groups):
            futures[pool.submit(_run_group, items, fn, finish[0] if finish else None, files)] = n
        for future in concurrent.futures.as_completed(futures):
            error = future.exception()
            if error is not None and not isinstance(error, Exception):
                raise error  # KeyboardInterrupt, SystemExit
            yield futures[future], error
    finally:
        for future in futures:
            future.cancel()
        concurrent.futures.wait(futures)  # no read left on a file about to close
        files.close()


class _Files:
    """The files' tables and open descriptors, shared by the workers of one :func:`run_groups`."""

    def __init__(self, layouts: dict[Path, dict]) -> None:
        self.layouts, self.fds, self.lock = layouts, {}, threading.Lock()
        self.tried: set[Path] = set()  # files opened (or tried) to keep: each at most once

    def entry(self, info: SnapshotInfo, key: str) -> tuple:
        """``(dtype, shape, file offset, bytes)`` of ``key`` in ``info``'s file (its header read on first use, also
        where the caller read it before: its descriptor is kept for every read of it)."""
        layout = self.layouts.get(info.path)
        if layout is None or info.path not in self.tried:
            with self.lock:
                if info.path not in self.layouts:
                    self.layouts[info.path] = _known(info) or parse_layout(info.path)
                if info.path not in self.tried:
                    if len(self.fds) < _OPEN_FILES:
                        with contextlib.suppress(OSError):  # then each read opens it, and names it if it cannot
                            self.fds[info.path] = os.open(info.path, os.O_RDONLY)
                    self.tried.add(info.path)  # after the descriptor: another worker reading it finds it
                layout = self.layouts[info.path]
        entry = layout.get(key)
        if entry is None:
            raise SnapshotError(f"{info.path}: holds no tensor {key!r} (truncated or corrupted?)")
        return entry

    def close(self) -> None:
        with self.lock:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()


def layout(info: SnapshotInfo, layouts: dict[Path, dict]) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """``key -> (dtype, shape, file offset, bytes)`` of a snapshot :func:`supports` reads, from ``layouts``, the
    info (what ``read_info`` parsed, while the file has the size it had then) or its header (then kept in
    ``layouts``); :class:`SnapshotError` when it is not a safetensors file."""
    if info.path not in layouts:
        layouts[info.path] = _known(info) or parse_layout(info.path)
    return layouts[info.path]


def _known(info: SnapshotInfo) -> dict | None:
    """The layout ``read_info`` parsed, if the file still has the size it had then (else None: parse it again)."""
    if info.stored is None:
        return None
    try:
        return info.stored if os.stat(info.path).st_size == info.nbytes else None
    except OSError:
        return None  # (parsing it again names the problem)


def in_chunks(info: SnapshotInfo, keys: Sequence[str], layouts: dict[Path, dict]) -> list[list[str]]:
    """``keys`` of one snapshot :func:`supports` reads, in their order, cut into groups of about 4 x :data:`CHUNK`
    bytes (one key at least): groups for :func:`run_groups` that keep every worker busy on one file. The
    file's table goes into ``layouts``; :class:`SnapshotError` when it is not a safetensors file or lacks a key."""
    table = layout(info, layouts)
    groups: list[list[str]] = []
    size = 0
    for key in keys:
        if key not in table:
            raise SnapshotError(f"{info.path}: holds no tensor {key!r} (truncated or corrupted?)")
        nbytes = table[key][3]
        if not groups or (size and size + nbytes > _GROUP):
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    return groups


_LOCAL = threading.local()


def _buffer() -> tuple[Tensor, memoryview]:
    """This thread's read buffer (kept: fresh memory costs a page fault every 4 KiB, more than the read itself)."""
    if getattr(_LOCAL, "buf", None) is None or _LOCAL.buf.numel() != CHUNK:
        _LOCAL.buf = torch.empty(CHUNK, dtype=torch.uint8)
        _LOCAL.view = memoryview(_checksums.buffer_of(_LOCAL.buf)).cast("B")
    return _LOCAL.buf, _LOCAL.view


def _run_group(items: Sequence[tuple], fn: PieceFn, finish: Callable[[], None] | None, files: _Files) -> None:
    _checksums.single_threaded(_read_group, items, fn, finish, files)


def _read_group(items: Sequence[tuple], fn: PieceFn, finish: Callable[[], None] | None, files: _Files) -> None:
    """One group's items read in order (neighbours in a file in one read), each read handed to ``fn``."""
    buf, view = _buffer()
    run: list[tuple] = []
    for info, key in items:
        item = (info, key, files.entry(info, key))
        _, _, (_, _, offset, nbytes) = item
        if run and (run[0][0] is not info or offset != run[-1][2][2] + run[-1][2][3]
                    or offset + nbytes - run[0][2][2] > CHUNK):  # fmt: skip
            _read_run(run, fn, files.fds, buf, view)
            run = []
        if nbytes > CHUNK:
            _read_large(item, fn, files.fds, buf, view)
        else:
            run.append(item)
    if run:
        _read_run(run, fn, files.fds, buf, view)
    if finish is not None:
        finish()


def _pread(info: SnapshotInfo, fds: dict, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``info``'s file at ``offset``."""
    fd = fds.get(info.path)
    own = fd is None
    try:
        if own:
            fd = os.open(info.path, os.O_RDONLY)
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"the file ends {len(view) - done} bytes before its tensors do (truncated?)")
            done += got
    except OSError as e:
        raise SnapshotError(f"{info.path}: cannot read its tensors: {e}") from None
    finally:
        if own and fd is not None:
            os.close(fd)


def _check(info: SnapshotInfo, key: str, crc: int) -> None:
    expected = info.checksums.get(key)
    if expected is not None and int(expected, 16) != crc:
        raise SnapshotError(
            f"{info.path}: tensor {key!r} does not match its checksum: the file is corrupted "
            f"(a flipped bit, or data swapped between tensors)"
        )


def _read_run(run: list[tuple], fn: PieceFn, fds: dict, buf: Tensor, view: memoryview) -> None:
    """Tensors side by side in one file, in one read: each checked, then all handed to ``fn`` at once."""
    info, start = run[0][0], run[0][2][2]
    total = run[-1][2][2] + run[-1][2][3] - start
    _pread(info, fds, view[:total], start)
    algorithm = info.checksum_algorithm if info.checksums is not None else None
    pieces = []
    for _, key, (dtype, shape, offset, nbytes) in run:
        a = offset - start
        if algorithm is not None:
            _check(info, key, _checksums.extend(0, view[a : a + nbytes], algorithm))
        pieces.append(Piece(key, dtype, shape, 0, a, nbytes))
    fn(info, pieces, buf[:total])


def _read_large(item: tuple, fn: PieceFn, fds: dict, buf: Tensor, view: memoryview) -> None:
    """A tensor larger than the buffer, in pieces: each handed to ``fn`` as it is read, the checksum checked after."""
    info, key, (dtype, shape, offset, nbytes) = item
    algorithm = info.checksum_algorithm if info.checksums is not None else None
    step = CHUNK - CHUNK % dtype.itemsize
    crc = 0
    for a in range(0, nbytes, step):
        n = min(step, nbytes - a)
        _pread(info, fds, view[:n], offset + a)
        if algorithm is not None:
            crc = _checksums.extend(crc, view[:n], algorithm)
        fn(info, [Piece(key, dtype, shape, a // dtype.itemsize, 0, n)], buf[:n])
    if algorithm is not None:
        _check(info, key, crc)
