"""Atomic file writes: write under a hidden temporary name, fsync, rename into place."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def temporary_name(final: Path) -> Path:
    """The hidden name a file is written under before it is renamed to ``final``."""
    return final.with_name(f".{final.name}.{os.getpid()}.tmp")


def write_then_rename(writes: list[tuple[Path, Callable[[Path], None]]]) -> None:
    """Write every file to its temporary name, then rename them all into place.

    ``writes`` pairs each final path with a function that writes the file at the path it is
    given. A crash or an error leaves no partial file under a final name (a hard kill may
    leave a hidden ``.*.tmp`` file, which no reader looks at); if any write fails, none of
    the files is renamed.
    """
    done: list[tuple[Path, Path]] = []
    try:
        for final, write in writes:
            tmp = temporary_name(final)
            done.append((tmp, final))
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        for tmp, final in done:
            os.replace(tmp, final)
    finally:
        for tmp, _ in done:
            if tmp.exists():
                tmp.unlink()
    for directory in {final.parent for _, final in done}:
        fsync_dir(directory)  # make the renames durable


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (renames into it) to disk, where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
