"""The diffusion recipe's run directory: atomic checkpoint writes, the hidden temporary names and
the removal of those killed writers left, cutting the JSONL log back to a step, and listing
(and deleting) what a run left in ``out_dir``."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import socket
import time
from pathlib import Path

import torch

from emakit import snapshots

# --------------------------------------------------------------------------- checkpoints


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary name, fsync, then rename: a crash never leaves a loadable partial file.

    A full disk or a file size limit raises an ``OSError`` that says so; the previous file at
    ``path`` is untouched and the temporary file removed.
    """
    tmp = _temporary(path)
    try:
        # Through a Python file object, not the path: torch's own file writer reports a full disk
        # as "unexpected pos"; this way the OSError (ENOSPC, EFBIG) survives in the exception chain.
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        code = next((c for c in _errnos(e) if c in _NO_SPACE), None)
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = math.inf
        if code is None and free >= 1 << 20:  # neither an errno nor a disk that says "full"
            raise
        raise OSError(
            code or errno.ENOSPC,
            f"no space left on device (or file size limit) while writing {path} ({free / 2**20:.1f} MiB free "
            f"there); the previous {path.name} is intact. Free some space (or raise the file size limit, "
            f"`ulimit -f`) and continue with --resume",
        ) from e
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


_NO_SPACE = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _errnos(e: BaseException | None):
    """The errno of an exception and of those it was raised from or during (torch wraps OSErrors)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield getattr(e, "errno", None)
        e = e.__cause__ or e.__context__


def _fsync_dir(directory: Path) -> None:
    """Make a rename into ``directory`` durable, where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
# The recipe's temporary names; nothing else in out_dir is ever removed as a temporary (the
# snapshots' temporaries in phema/ are emakit's, which removes those of dead writers itself).
_TEMPORARY = re.compile(r"^\.(checkpoint\.pt|log\.jsonl)\.(?P<writer>.+)\.tmp$")


def _temporary(path: Path) -> Path:
    """The hidden name ``path`` is written under before the rename: ``.<name>.<host>.<pid>.tmp``."""
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.tmp")


def remove_stale_temporaries(directory: Path, max_age_s: float = 3600.0) -> list[Path]:
    """Delete the temporary files that killed writers of this recipe left in ``directory``; returns them.

    A temporary file (``.checkpoint.pt.<host>.<pid>.tmp``, ``.log.jsonl.<host>.<pid>.tmp``) is
    stale when it was written on this host by a process that is not alive, or by this process
    (pids are reused, e.g. in containers, and this process writes one file at a time, never
    while calling this); or, whatever its name (another host on a shared file system, an older
    name without a pid), when it has not been modified for ``max_age_s`` seconds: a live
    writer keeps its file's mtime fresh. Files of live writers are left alone.
    """
    removed = []
    if not directory.is_dir():
        return removed
    now = time.time()
    for path in directory.iterdir():
        match = _TEMPORARY.match(path.name)
        if match is None or not path.is_file():
            continue
        host, _, pid = match["writer"].rpartition(".")
        dead = host == _HOST and pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid)))
        try:
            stale = dead or now - path.stat().st_mtime > max_age_s
        except FileNotFoundError:
            continue  # its writer renamed or removed it meanwhile
        if stale:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if os.name == "nt":
        return True  # os.kill(pid, 0) would terminate it on Windows: judge by age alone
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def cut_log(path: Path, step: int) -> int:
    """Keep the rows of the JSONL log ``path`` up to ``step`` (atomically); returns how many were dropped.

    Rows are kept as written. A row whose step does not follow the previous one starts a
    restarted part of the run and replaces the rows it repeats (logs of earlier versions of
    this recipe kept them), and a torn last line (a kill in the middle of a write) is dropped.
    """
    if not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept: list[tuple[int, str]] = []
    for number, line in enumerate(lines, 1):
        try:
            row_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            if number == len(lines):
                continue  # torn by a kill in the middle of the write
            raise ValueError(
                f"{path}, line {number}: expected a JSON row with a step, got {line[:80]!r}; "
                f"fix or delete that line and resume again"
            ) from None
        while kept and kept[-1][0] >= row_step:
            kept.pop()
        kept.append((row_step, line if line.endswith("\n") else line + "\n"))
    kept = [(s, line) for s, line in kept if s <= step]
    if len(kept) == len(lines) and all(line.endswith("\n") for line in lines):
        return 0
    tmp = _temporary(path)
    try:
        with open(tmp, "w") as f:
            f.writelines(line for _, line in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return len(lines) - len(kept)


def raw_checkpoints(out: Path) -> list[Path]:
    """The run's ordinary checkpoints of the raw weights, ``raw/model-<step>.pt`` (``raw_every``)."""
    folder = out / "raw"
    return sorted(folder.glob("model-*.pt"), key=lambda p: int(p.stem.split("-")[1])) if folder.is_dir() else []


def run_files(out: Path) -> list[Path]:
    """What a run leaves in ``out``: checkpoint, log, snapshots, raw checkpoints, TensorBoard events (not temporaries)."""
    found = [p for p in (out / "checkpoint.pt", out / "log.jsonl") if p.exists()]
    if (out / "phema").is_dir():
        found += snapshots.snapshot_paths(out / "phema")
    found += raw_checkpoints(out)
    if (out / "tensorboard").is_dir() and any((out / "tensorboard").iterdir()):
        found.append(out / "tensorboard")
    return found


def _describe(paths: list[Path], out: Path) -> str:
    snaps = [p for p in paths if p.parent.name == "phema"]
    raw = [p for p in paths if p.parent.name == "raw"]
    names = [p.relative_to(out).as_posix() + ("/" if p.is_dir() else "") for p in paths if p not in snaps + raw]
    if snaps:
        names.append(f"{len(snaps)} snapshot{'s' * (len(snaps) != 1)} in phema/")
    if raw:
        names.append(f"{len(raw)} raw checkpoint{'s' * (len(raw) != 1)} in raw/")
    return ", ".join(names)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
