"""Atomic file writes: write under a unique hidden temporary name, fsync, move into place.

Owns the rules every writer of the package follows:

- temporary names are unique per writer (host, process and a random part), hidden (leading
  dot) and end in ``.tmp``, so no reader lists them and two writers never share one;
- the move into place never replaces an existing file (``os.link`` + unlink: with two
  writers aimed at one name, exactly one wins and the other gets ``FileExistsError``);
- files get the permissions the umask gives (``0o666 & ~umask``), whatever the library
  that wrote them chose;
- temporary files of writers that died (same host, process gone) are removed by the next
  write to the same directory.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import socket
from collections.abc import Callable
from pathlib import Path

_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"
_TEMP = re.compile(r"^\.(?P<final>.+)\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>[0-9]+)\.[0-9a-f]{8}\.tmp$")


def temporary_name(final: Path, token: str | None = None) -> Path:
    """A unique hidden name to write ``final`` under before it is moved into place.

    ``token`` (8 hex digits) makes the name reproducible across the ranks of a collective
    write; by default it is random.
    """
    token = token or secrets.token_hex(4)
    return final.with_name(f".{final.name}.{_HOST}.{os.getpid()}.{token}.tmp")


def is_temporary(name: str) -> bool:
    return _TEMP.match(name) is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def reclaim_stale(directory: Path) -> list[Path]:
    """Remove the temporary files and folders that dead writers on this host left in ``directory``."""
    import shutil

    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match is None or match["host"] != _HOST or _alive(int(match["pid"])):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except FileNotFoundError:
            pass  # another process reclaimed it first
    return removed


def umask_mode(base: int = 0o666) -> int:
    """``base & ~umask``: the mode a plain ``open()`` would give a new file."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return base & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # (not thread-safe: only where /proc is missing)
    os.umask(mask)
    return base & ~mask


def link_into_place(tmp: Path, final: Path, where: str = "write") -> None:
    """Move the file ``tmp`` to ``final`` unless ``final`` exists: then ``FileExistsError``, ``tmp`` kept."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise FileExistsError(
            errno.EEXIST, f"{where}: {final} already exists (written by another writer meanwhile?); not replaced"
        ) from None
    os.unlink(tmp)


def write_then_rename(writes: list[tuple[Path, Callable[[Path], None]]], *, replace: bool = True) -> None:
    """Write every file to its temporary name, then move them all into place.

    ``writes`` pairs each final path with a function that writes the file at the path it is
    given: a file of the final name inside a hidden temporary directory of this writer, so
    whatever the writing library creates beside it (safetensors writes through a temporary
    file of its own) goes too. A crash or an error leaves no partial file under a final name
    (a hard kill may leave the hidden temporary directory, which no reader looks at and the
    next write to that directory removes); if any write fails, none of the files is moved.
    ``replace=False`` refuses to replace an existing final file, atomically
    (``FileExistsError``).
    """
    import shutil

    for directory in {final.parent for final, _ in writes}:
        reclaim_stale(directory)
    done: list[tuple[Path, Path]] = []
    mode = umask_mode()
    try:
        for final, write in writes:
            holder = temporary_name(final)
            holder.mkdir()
            tmp = holder / final.name
            done.append((tmp, final))
            try:
                write(tmp)
            except Exception as e:
                full = _disk_full(e, final)
                if full is None:
                    raise
                raise full from e
            os.chmod(tmp, mode)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        for tmp, final in done:
            if replace:
                os.replace(tmp, final)
            else:
                link_into_place(tmp, final)
    finally:
        for tmp, _ in done:
            shutil.rmtree(tmp.parent, ignore_errors=True)
    for directory in {final.parent for _, final in done}:
        fsync_dir(directory)  # make the moves durable


def _disk_full(error: BaseException, final: Path) -> OSError | None:
    """An ``OSError`` saying the disk (or the file-size limit) is full, if that is what ``error`` is."""
    code = getattr(error, "errno", None)
    text = str(error)
    if code is None:  # libraries that wrap the OS error in their own type (safetensors: "os error 28")
        match = re.search(r"os error (\d+)", text)
        code = int(match.group(1)) if match else None
    reasons = {errno.ENOSPC: "no space left on device", errno.EFBIG: "the file-size limit (ulimit -f) was reached"}
    if hasattr(errno, "EDQUOT"):
        reasons[errno.EDQUOT] = "the disk quota is exceeded"
    if code not in reasons:
        return None
    return OSError(code, f"{reasons[code]} while writing {final}; nothing was written under that name")


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
