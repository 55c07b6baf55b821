"""The decoded values of compact averages (flat, fp32) kept while reading: a delta is decoded against the value of the same
tensor in an earlier snapshot, so reading a directory in time order decodes each tensor once.

Keys are ``avg.<j>/<name>``; a value is kept with the identity of its file (device, inode, change time, size:
a file rewritten since, by ``prune`` say, is decoded again), the last two per key (a predicted delta reads its
reference and the reference's reference), for one directory at a time.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from torch import Tensor

from .header import SnapshotInfo, file_name

#: The last two decoded values of each compact average: ``key -> [(file identity, fp32 tensor), ...]``, newest first,
#: of one directory (a predicted delta needs its reference and the reference's reference).
_DECODED: dict[str, list[tuple[tuple, Tensor]]] = {}
_DECODED_DIRECTORY: list[Path] = []  # the directory those values come from
_DECODED_LOCK = threading.Lock()


def clear_decoded_cache() -> None:
    """Free the decoded averages kept while reading compact snapshots (at most two snapshots' worth)."""
    _DECODED.clear()
    _DECODED_DIRECTORY.clear()


def identity(path: Path) -> tuple:
    """Which file, as it is now: the same file by any path name, changed when rewritten (no ``resolve``: slow)."""
    status = os.stat(path)
    return (status.st_dev, status.st_ino, status.st_mtime_ns, status.st_size, status.st_mode)


def file_at(info: SnapshotInfo, t: float, known: dict | None) -> tuple[Path, tuple | None]:
    """The snapshot file at ``t`` beside ``info`` and its identity (``None``: no such file). ``known``: what one
    batch of ``info``'s tensors found already (a stat per file, not per tensor)."""
    if known is not None and t in known:
        return known[t]
    path = info.path.parent / file_name(t) if t != info.t else info.path
    try:
        found = path, identity(path)  # one stat: it also says whether the file is there
    except OSError:
        found = path, None
    if known is not None:
        known[t] = found
    return found


def cached(key: str, file_id: tuple) -> Tensor | None:
    """The value of ``key`` decoded from the file of identity ``file_id``, if kept."""
    for known, value in _DECODED.get(key, ()):  # (a loop: called several times per tensor read)
        if known == file_id:
            return value
    return None


def remember(info: SnapshotInfo, values: list[tuple[str, Tensor]], file_id: tuple) -> None:
    """Keep ``(key, value)`` pairs decoded from ``info`` (of identity ``file_id``), dropping all but the newest other."""
    directory = Path(os.path.abspath(info.path.parent))
    with _DECODED_LOCK:  # keys are decoded on several threads at once (each key by one)
        if _DECODED_DIRECTORY != [directory]:
            clear_decoded_cache()  # another directory: keep one directory's worth
            _DECODED_DIRECTORY.append(directory)
        for key, value in values:
            older = [entry for entry in _DECODED.get(key, ()) if entry[0] != file_id]
            _DECODED[key] = [(file_id, value), *older[:1]]
