"""Checkpoint directories in ``torch.distributed.checkpoint`` (DCP) format: atomic save, checked load.

Owns the DCP file I/O used by ``EMA.save`` / ``EMA.load`` (and older sharded snapshots): a
save written under a hidden name and renamed by rank 0 once complete, the metadata read, and
an in-place load; and that collective atomic directory write itself
(:func:`write_directory`), which the pickle-free sharded snapshots use too. DCP's metadata and small entries are pickled: read only what you trust.
Knows nothing about averages or snapshots (callers give it state dicts).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import distributed
from . import checksums as _checksums
from . import limits as _limits
from .atomic import _disk_full, fsync_dir, reclaim_stale, temporary_name, umask_mode

__all__ = [
    "CHECKSUMS",
    "CheckpointError",
    "load",
    "read_metadata",
    "save_atomic",
    "verify_checksums",
    "write_directory",
]

#: The file in a DCP directory written by emakit that holds the checksum of every stored item.
CHECKSUMS = "emakit-checksums.json"
_CHECKSUMS_FORMAT = "emakit.dcp-checksums"
_CHUNK = 16 << 20  # bytes read at a time while checksumming


class CheckpointError(RuntimeError):
    """A DCP checkpoint directory that cannot be read or written; the message names the path.

    torch's own ``CheckpointException`` derives from ``BaseException`` (it escapes ``except
    Exception``), and a damaged directory can also surface as ``EOFError``, ``AssertionError``
    or an unpickling error: all of them become this.
    """


def _failure(where: str, path, action: str, error: BaseException) -> CheckpointError:
    failures = getattr(error, "failures", None)  # CheckpointException: {rank: (exception, traceback)}
    if isinstance(failures, dict) and failures:
        cause = next(iter(failures.values()))
        error = cause[0] if isinstance(cause, tuple) and isinstance(cause[0], BaseException) else error
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    detail = f"{type(error).__name__}: {first}"[:300]
    return CheckpointError(f"{where}: could not {action} {path} (truncated, corrupted or incomplete?): {detail}")


def _dcp_errors() -> tuple[type[BaseException], ...]:
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def save_atomic(where: str, state: dict[str, Any], final: Path, extra: Callable[[Path], None] | None = None) -> Path:
    """``dcp.save(state)`` into a unique hidden directory that rank 0 moves to ``final`` once complete.

    Collective: every rank calls it with the same ``final`` (on a file system they share, as
    DCP requires). Each rank writes only its own shards, taking the checksum of every stored
    item as its bytes go to the file (nothing is read back); rank 0 adds :data:`CHECKSUMS`,
    the checksum of every stored item (rank 0's :func:`~emakit._files.checksums.preferred`
    algorithm), which :func:`verify_checksums` checks before a load. See :func:`write_directory`.
    """
    table: list[list] = []
    algorithm = distributed.all_gather_object(_checksums.preferred())[0]  # rank 0's, on every rank

    def save(tmp: Path) -> None:
        import torch.distributed.checkpoint as dcp

        writer = _hashing_writer(tmp, algorithm)
        with warnings.catch_warnings():  # single process: DCP warns that it assumes one; it is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            try:
                dcp.save(state, storage_writer=writer)
            except _dcp_errors() as e:
                raise _failure(where, final, "write", e) from None
        distributed.barrier()  # the coordinator's .metadata is complete
        table.extend(_gathered(where, final, lambda: _written_rows(read_metadata(where, tmp), writer.fs.written)))

    def describe(tmp: Path) -> None:
        metadata = read_metadata(where, tmp)
        table[:] = [row for row in table if row[5] is not None]
        missing = {(s.relative_path, s.offset, s.length) for s in metadata.storage_data.values()}
        missing -= {(row[2], row[3], row[4]) for row in table}
        if missing:  # an item whose bytes were not one segment as written (not seen with torch's writer): read it
            table.extend(_checksum_share(metadata, tmp, algorithm, missing))
        record = {"format": _CHECKSUMS_FORMAT, "version": 1, "items": sorted(table, key=lambda r: (r[2], r[3]))}
        if algorithm != _checksums.LEGACY:
            record["algorithm"] = algorithm
        (tmp / CHECKSUMS).write_text(json.dumps(record))
        if extra is not None:
            extra(tmp)

    return write_directory(where, final, save, extra=describe, collective_errors=True)


def _files_of(metadata) -> dict[str, list]:
    """Stored items by file: ``file -> [(MetadataIndex, _StorageInfo)]``."""
    files: dict[str, list] = {}
    for index, info in metadata.storage_data.items():
        files.setdefault(info.relative_path, []).append((index, info))
    return files


def _my_files(files: dict[str, list]) -> list[str]:
    """This rank's share of the files to checksum (all of them without a process group)."""
    world, me = distributed.world_size(), distributed.rank()
    return [n for j, n in enumerate(sorted(files)) if j % world == me]


def _crc(f, offset: int, length: int, algorithm: str) -> str:
    f.seek(offset)
    crc, left = 0, length
    while left > 0:
        chunk = f.read(min(_CHUNK, left))
        if not chunk:
            break  # truncated: the checksum of what is there cannot match
        crc = _checksums.extend(crc, chunk, algorithm)
        left -= len(chunk)
    return f"{crc:08x}" if left == 0 else "truncated"


def _row(index, info, digest: str) -> list:
    """``[fqn, chunk offset, file, byte offset, length, checksum]`` of one stored item."""
    offset = None if index.offset is None else list(index.offset)
    return [index.fqn, offset, info.relative_path, info.offset, info.length, digest]


def _checksum_share(metadata, directory: Path, algorithm: str, only: set | None = None) -> list[list]:
    """The rows of every item in this rank's share of the files (all ``only`` lists, with ``only``), read back.

    The files are read on the checksum threads, a file per thread.
    """
    files = _files_of(metadata)
    names = sorted(files) if only is not None else _my_files(files)

    def rows_of(name: str) -> list[list]:
        items = [(i, s) for i, s in files[name] if only is None or (s.relative_path, s.offset, s.length) in only]
        if not items:
            return []
        with open(directory / name, "rb") as f:
            return [_row(index, info, _crc(f, info.offset, info.length, algorithm)) for index, info in items]

    return [row for rows in _checksums.pool().map(rows_of, names) for row in rows]


class _HashingStream:
    """A file being written that takes the checksum of the bytes between two ``tell()`` calls.

    DCP asks ``tell()`` just before and just after it writes each item, so each item's bytes
    are one segment: ``segments[(offset, length)] = checksum``.
    """

    def __init__(self, raw, algorithm: str) -> None:
        self._raw, self._algorithm = raw, algorithm
        self._start, self._length, self._crc = raw.tell(), 0, 0
        self.segments: dict[tuple[int, int], str] = {}

    def write(self, data) -> int:
        written = self._raw.write(data)
        self._crc = _checksums.extend(self._crc, memoryview(data).cast("B")[:written], self._algorithm)
        self._length += written
        return written

    def end_segment(self) -> None:
        if self._length:
            self.segments[(self._start, self._length)] = f"{self._crc:08x}"
        self._start, self._length, self._crc = self._start + self._length, 0, 0

    def tell(self) -> int:
        self.end_segment()
        self._start = self._raw.tell()
        return self._start

    def close(self) -> None:
        self.end_segment()
        self._raw.close()

    def __getattr__(self, name: str):
        return getattr(self._raw, name)


def _hashing_writer(path: Path, algorithm: str):
    """DCP's file writer for ``path``, whose streams record the checksum of every item written (``fs.written``)."""
    from contextlib import contextmanager

    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import FileSystem

    class HashingFileSystem(FileSystem):
        @contextmanager
        def create_stream(self, path, mode: str):
            with super().create_stream(path, mode) as stream:
                if "w" not in mode:
                    yield stream
                    return
                hashing = _HashingStream(stream, algorithm)
                yield hashing
                hashing.end_segment()
                self.written[Path(path).name] = hashing.segments

    writer = FileSystemWriter(path)
    writer.fs = HashingFileSystem()
    writer.fs.written = {}
    return writer


def _written_rows(metadata, written: dict[str, dict]) -> list[list]:
    """Rows of the items this rank wrote, from their recorded checksums (None where a segment is not one item)."""
    rows = []
    for name, items in _files_of(metadata).items():
        if name in written:
            rows += [_row(i, s, written[name].get((s.offset, s.length))) for i, s in items]
    return rows


def _gathered(where: str, path: Path, work: Callable[[], list]) -> list:
    """Every rank's ``work()`` results, concatenated; if any rank failed, every rank raises."""
    try:
        result: Any = work()
    except (OSError, CheckpointError) as e:
        result = f"{type(e).__name__}: {e}"
    results = distributed.all_gather_object(result)
    failed = [r for r in results if isinstance(r, str)]
    if failed:
        raise CheckpointError(f"{where}: could not checksum {path}: {failed[0]}")
    return [row for rows in results for row in rows]


def verify_checksums(where: str, path: Path, metadata) -> None:
    """Check every stored item of ``path`` against its :data:`CHECKSUMS` entry (collective; each rank a share).

    Raises :class:`CheckpointError` naming the file and the tensor on any mismatch, a missing
    or unlisted item, or a malformed checksum file. Directories without the file (written by
    ``dcp.save`` directly, or by emakit 0.1) are not checked.
    """
    path = Path(path)
    if not (path / CHECKSUMS).exists():
        return
    try:
        record = _limits.read_json(path / CHECKSUMS)  # a regular file, capped in size and nesting
        if record.get("format") != _CHECKSUMS_FORMAT:
            raise ValueError(f"format={record.get('format')!r}")
        listed = {(r[2], int(r[3]), int(r[4])): (str(r[0]), r[1], str(r[5])) for r in record["items"]}
        algorithm = _checksums.check_algorithm(record.get("algorithm", _checksums.LEGACY), str(path / CHECKSUMS))
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(
            f"{where}: {path / CHECKSUMS} is malformed ({e}); the checkpoint cannot be verified"
        ) from None
    stored = {(info.relative_path, info.offset, info.length) for info in metadata.storage_data.values()}
    if stored != set(listed):
        raise CheckpointError(
            f"{where}: {path}: its .metadata and {CHECKSUMS} list different items (mixed up or damaged checkpoint)"
        )

    def share() -> list:
        problems = []
        for row in _checksum_share(metadata, path, algorithm):
            fqn, _, want = listed[(row[2], row[3], row[4])]
            if row[5] == "truncated":
                problems.append(f"{path / row[2]}: truncated: tensor {fqn!r} lies past the end of the file")
            elif row[5] != want:
                problems.append(
                    f"{path / row[2]}: tensor {fqn!r} does not match its checksum: the checkpoint is corrupted"
                )
        return problems

    problems = _gathered(where, path, share)
    if problems:
        raise CheckpointError(
            f"{where}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        )


def write_directory(
    where: str,
    final: Path,
    write: Callable[[Path], None],
    *,
    extra: Callable[[Path], None] | None = None,
    collective_errors: bool = False,
) -> Path:
    """Every rank's ``write(tmp)`` into one unique hidden directory that rank 0 moves to ``final``.

    Collective: every rank calls it with the same ``final`` on a file system they share; the
    temporary name is chosen by rank 0 and shared. ``extra(tmp)`` runs on rank 0 once every
    rank has written (to add an index or description file). A rank whose ``write`` fails
    makes every rank raise (its own error, or :class:`CheckpointError` on the others), unless
    ``collective_errors`` says ``write`` already raises on all ranks alike. A crash leaves
    only the hidden temporary directory, which no reader lists and the next write into that
    folder removes once its writer is dead. An existing ``final`` is never replaced, also
    when another writer creates it meanwhile: then ``FileExistsError`` and nothing is left
    behind.
    """
    final = Path(final)
    if final.exists():
        raise FileExistsError(f"{where}: {final} already exists; choose a new path (checkpoints are never replaced)")
    tmp = Path(distributed.all_gather_object(str(temporary_name(final)))[0])  # rank 0's name (host, pid) for all
    if distributed.rank() == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        reclaim_stale(final.parent)
    distributed.barrier()
    try:
        if distributed.rank() == 0:
            tmp.mkdir(exist_ok=True)
        distributed.barrier()
        _write_agreed(where, final, tmp, write, collective_errors)
        distributed.barrier()
        if distributed.rank() == 0:
            if extra is not None:
                extra(tmp)
            _publish(where, tmp, final)
    finally:
        if distributed.rank() == 0 and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # a failed save leaves nothing
    distributed.barrier()
    return final


def _write_agreed(where: str, final: Path, tmp: Path, write: Callable[[Path], None], collective: bool) -> None:
    """``write(tmp)`` on this rank; with ``collective`` False, every rank learns whether any rank failed."""
    if collective:
        write(tmp)
        return
    error: BaseException | None = None
    try:
        write(tmp)
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
        error = _disk_full(e, final) or e
    if distributed.any_rank(error is not None):
        if error is not None:
            raise error
        raise CheckpointError(f"{where}: could not write {final}: another rank failed to write its part")


def _publish(where: str, tmp: Path, final: Path) -> None:
    """Rank 0: fix modes, fsync every file, and rename the complete directory into place."""
    mode = umask_mode()
    for file in tmp.iterdir():
        os.chmod(file, mode)
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    try:
        os.rename(tmp, final)  # a directory: fails if final exists and is not empty
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(f"{where}: {final} was created by another writer meanwhile; not replaced") from None
        raise
    fsync_dir(final.parent)


def read_metadata(where: str, path: Path):
    """The DCP metadata of a checkpoint directory (pickled by DCP: load only checkpoints you trust)."""
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{where}: {path} is not a torch.distributed.checkpoint directory (no .metadata)")
    try:
        return FileSystemReader(str(path)).read_metadata()
    except _dcp_errors() as e:
        raise _failure(where, path, "read the metadata of", e) from None


def load(
    state: dict[str, Any], path: Path, *, no_dist: bool = False, flatten: bool = True, where: str = "load"
) -> None:
    """``dcp.load`` in place (collective unless ``no_dist``); :class:`CheckpointError` naming ``path`` on failure.

    On failure the tensors of ``state`` may be partly overwritten: read into staging tensors
    when that matters.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner

    planner = DefaultLoadPlanner(flatten_state_dict=flatten, flatten_sharded_tensors=flatten)
    with warnings.catch_warnings():  # DCP warns that a single process is assumed: that is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load(state, checkpoint_id=str(path), planner=planner, no_dist=no_dist or not distributed.dist_ready())
        except _dcp_errors() as e:
            raise _failure(where, path, "read", e) from None
