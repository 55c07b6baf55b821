"""Reading tensors of single-file snapshots ahead of their use: on threads, into tensors of their own, checked.

Owns the fast path under reconstruction and ``emakit verify``: given ``(snapshot, key)`` pairs
in the order they will be used, from any number of plain (not compact) ``phema-<t>.safetensors``
files, :func:`read_ahead` reads each tensor with ``os.preadv`` and takes its checksum on the
checksum threads (both release the GIL), up to :data:`AHEAD_BYTES` ahead of the caller, who
gets each tensor only once it matched its header checksum. So the caller's work on one tensor
(a weighted sum) overlaps the reading and checking of the next ones, and the order may run
across files (a tensor of every snapshot in turn, keeping the sum in cache). Offsets come
from each file's safetensors header, checked against the file's size and the tensors'
shapes and dtypes.

    for info, key, value in read_ahead([(info, "avg.0/w") for info in infos]):
        ...
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import math
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from . import checksums as _checksums
from .header import SnapshotError, SnapshotInfo

#: Bytes of tensors read and checked ahead of the one in use (also at most 64 tensors).
AHEAD_BYTES = 64 << 20
#: Bytes read in one call at most (tensors side by side in a file).
_GROUP = 16 << 20
#: Bytes of a file's tensors that :func:`read_ahead` takes from every file in turn (``reorder``).
_BLOCK = 4 << 20
#: Files kept open at once; past that each read opens its file itself.
_OPEN_FILES = 256
#: Largest safetensors header read (safetensors' own limit is 100 MB).
_MAX_HEADER = 100 << 20

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def supports(info: SnapshotInfo) -> bool:
    """Whether :func:`read_ahead` reads this snapshot: a single file whose tensors are stored as they are."""
    return not info.sharded and info.encoding == "fp32"


def _layout(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """``key -> (dtype, shape, file offset, bytes)`` of a safetensors file, checked against its size."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or length > min(size - 8, _MAX_HEADER):
                raise ValueError(f"header length {length} in a file of {size} bytes")
            header = json.loads(f.read(length))
        table = {}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            dtype, shape = _DTYPES[entry["dtype"]], tuple(int(n) for n in entry["shape"])
            start, end = (int(n) for n in entry["data_offsets"])
            nbytes = math.prod(shape) * dtype.itemsize
            if min(shape, default=0) < 0 or not 0 <= start <= end or end - start != nbytes or 8 + length + end > size:
                raise ValueError(f"tensor {key!r} lies outside the file or does not match its shape")
            table[key] = (dtype, shape, 8 + length + start, nbytes)
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise SnapshotError(f"{path}: not a readable safetensors file (truncated or corrupted?): {e}") from None
    return table


def _read(path: Path, fd: int | None, entries: list[tuple], algorithm: str | None, buf: Tensor) -> tuple:
    """Adjacent tensors of ``path`` read in one go into ``buf``: ``([(tensor, checksum or None)], buf)``."""
    start = entries[0][2]
    total = entries[-1][2] + entries[-1][3] - start
    view = memoryview(_checksums.buffer_of(buf)).cast("B")[:total] if total else memoryview(b"")
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < total:
            got = os.preadv(fd, [view[done:]], start + done)
            if got <= 0:
                raise OSError(f"the file ends {total - done} bytes before its tensors do (truncated?)")
            done += got
    finally:
        if own:
            os.close(fd)
    out = []
    for dtype, shape, offset, nbytes in entries:
        a = offset - start
        raw = buf[a : a + nbytes] if a % dtype.itemsize == 0 else buf[a : a + nbytes].clone()
        digest = None if algorithm is None else f"{_checksums.extend(0, view[a : a + nbytes], algorithm):08x}"
        out.append((raw.view(dtype).view(shape), digest))
    return out, buf


def read_ahead(
    items: Iterable[tuple[SnapshotInfo, str]], *, recycle: bool = False, reorder: bool = False,
    ahead: int = AHEAD_BYTES,
) -> Iterator[tuple]:
    """``(info, key, tensor)`` of each ``(info, key)`` in order, each checked before it is yielded.

    ``info`` must be a snapshot :func:`supports` reads. Errors are :class:`SnapshotError`
    naming the file: a tensor the file does not hold, a short file, a checksum mismatch.
    Consecutive items that lie side by side in a file are read in one call (up to 16 MiB);
    ``reorder=True`` yields them in blocks instead: the tensors of a few MiB of a file's layout
    from every file in turn (each file's in its order), so a sum over the files of each
    tensor stays in cache; every key still comes file after file in the order given.
    ``recycle=True``: each tensor is valid only until the next one is taken or the iteration
    ends (its memory is read into again, also by later calls).
    """
    layouts: dict[Path, dict] = {}
    fds: dict[Path, int] = {}
    pending: collections.deque = collections.deque()
    spare = _Spare(recycle, ahead)
    group: list = []  # (info, key, entry) side by side in one file, not yet submitted

    def submit() -> None:
        info, entries = group[0][0], [e for _, _, e in group]
        algorithm = info.checksum_algorithm if info.checksums is not None else None
        nbytes = entries[-1][2] + entries[-1][3] - entries[0][2]
        job = _checksums.pool().submit(_read, info.path, fds.get(info.path), entries, algorithm, spare.take(nbytes))
        pending.append((info, [key for _, key, _ in group], job, nbytes))
        group.clear()

    try:
        for info, key, entry in _entries(items, layouts, fds, reorder):
            if group and (group[0][0] is not info or entry[2] != group[-1][2][2] + group[-1][2][3]
                          or entry[2] + entry[3] - group[0][2][2] > _GROUP):  # fmt: skip
                submit()
            group.append((info, key, entry))
            while pending and (sum(p[3] for p in pending) >= ahead or len(pending) > 64):
                yield from spare.lend(*_checked(*pending.popleft()[:3]))
        if group:
            submit()
        while pending:
            yield from spare.lend(*_checked(*pending.popleft()[:3]))
    finally:
        jobs = [job for _, _, job, _ in pending]
        concurrent.futures.wait(jobs)  # no read left on a file about to close
        spare.close(jobs)
        for fd in fds.values():
            os.close(fd)


def _entries(items: Iterable[tuple], layouts: dict, fds: dict, reorder: bool) -> Iterator[tuple]:
    """``(info, key, (dtype, shape, offset, nbytes))`` of each item, in the order :func:`read_ahead` yields them."""
    entries, files = [], {}
    for info, key in items:
        if info.path not in layouts:
            layouts[info.path] = _layout(info.path)
            if len(fds) < _OPEN_FILES:
                fds[info.path] = os.open(info.path, os.O_RDONLY)
        entry = layouts[info.path].get(key)
        if entry is None:
            raise SnapshotError(f"{info.path}: holds no tensor {key!r} (truncated or corrupted?)")
        if not reorder:
            yield info, key, entry
            continue
        files.setdefault(info.path, len(files))
        entries.append((info, key, entry))
    if not reorder:
        return
    # Blocks of keys, a few MiB of the first file that holds them each, in file order.
    block: dict[str, int] = {}
    count, filled = -1, _BLOCK
    for _, key, entry in sorted(entries, key=lambda e: (files[e[0].path], e[2][2])):
        if key not in block:
            if filled + entry[3] > _BLOCK:
                count, filled = count + 1, 0
            filled += entry[3]
            block[key] = count
    yield from sorted(entries, key=lambda e: (block[e[1]], files[e[0].path], e[2][2]))


def tensors(info: SnapshotInfo, keys: list[str], reader) -> Iterator[tuple[str, Tensor]]:
    """``(key, tensor)`` of every key of one snapshot: read ahead (in file order, each valid until the next) where
    :func:`supports` says so, else ``reader.get(key)`` in order."""
    if supports(info):
        for _, key, value in read_ahead([(info, key) for key in keys], recycle=True, reorder=True):
            yield key, value
    else:
        for key in keys:
            yield key, reader.get(key)


#: Buffers read into before, kept between calls (at most 2 x AHEAD_BYTES): fresh memory costs a page fault
#: every 4 KiB, more than the read itself.
_POOL: dict[int, list[Tensor]] = {}
_POOL_LOCK = threading.Lock()


class _Spare:
    """Byte buffers to read into again, by size: the one lent last comes back when the next is lent."""

    def __init__(self, recycle: bool, ahead: int) -> None:
        self._limit, self._lent = (2 * ahead if recycle else 0), None

    def take(self, nbytes: int) -> Tensor:
        size = -(-nbytes // (1 << 20)) << 20  # whole MiB: groups of other sizes share buffers
        with _POOL_LOCK:
            if self._limit and _POOL.get(size):
                return _POOL[size].pop()
        return torch.empty(size, dtype=torch.uint8)

    def give(self, buf: Tensor | None) -> None:
        if buf is None or not self._limit:
            return
        with _POOL_LOCK:
            if sum(b.numel() for kept in _POOL.values() for b in kept) + buf.numel() <= self._limit:
                _POOL.setdefault(buf.numel(), []).append(buf)

    def lend(self, items: list[tuple], buf: Tensor) -> list[tuple]:
        """``items``, read into ``buf``; the buffer lent before is free again."""
        self.give(self._lent)
        self._lent = buf if self._limit else None
        return items

    def close(self, jobs: list) -> None:
        """Every buffer back: the one lent last and those of reads not taken (``jobs``, finished)."""
        self.give(self._lent)
        self._lent = None
        for job in jobs:
            if not job.cancelled() and job.exception() is None:
                self.give(job.result()[1])


def _checked(info: SnapshotInfo, keys: list[str], job: concurrent.futures.Future) -> tuple[list[tuple], Tensor]:
    """``([(info, key, tensor)], buffer)`` of a finished read, each tensor checked against its checksum."""
    try:
        results, buf = job.result()
    except OSError as e:
        raise SnapshotError(f"{info.path}: cannot read tensors {keys[:3]}: {e}") from None
    for key, (_, digest) in zip(keys, results):
        if digest is not None and digest != info.checksums.get(key, digest):
            raise SnapshotError(
                f"{info.path}: tensor {key!r} does not match its checksum: the file is corrupted "
                f"(a flipped bit, or data swapped between tensors)"
            )
    return [(info, key, value) for key, (value, _) in zip(keys, results)], buf
