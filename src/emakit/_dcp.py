"""Checkpoint directories in ``torch.distributed.checkpoint`` (DCP) format: atomic save, checked load.

Owns the DCP file I/O used by ``EMA.save`` / ``EMA.load`` and by sharded snapshots: a save
written under a hidden name and renamed by rank 0 once complete, the metadata read, and an
in-place load. DCP's metadata and small entries are pickled: read only what you trust.
Knows nothing about averages or snapshots (callers give it state dicts).
"""

from __future__ import annotations

import errno
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import distributed
from ._atomic import fsync_dir, reclaim_stale, temporary_name, umask_mode

__all__ = ["CheckpointError", "load", "read_metadata", "save_atomic"]


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


def save_atomic(
    where: str, state: dict[str, Any], final: Path, extra: Callable[[Path], None] | None = None
) -> Path:
    """``dcp.save(state)`` into a unique hidden directory that rank 0 moves to ``final`` once complete.

    Collective: every rank calls it with the same ``final`` (on a file system they share, as
    DCP requires); the temporary name is chosen by rank 0 and shared. Each rank writes only
    its own shards. ``extra(tmp_dir)`` runs on rank 0 before the move (to add a small
    description file). A crash leaves only the hidden temporary directory, which no reader
    lists and the next save into that folder removes once its writer is dead. An existing
    ``final`` is never replaced, also when another writer creates it meanwhile: then
    ``FileExistsError`` and nothing is left behind.
    """
    import torch.distributed.checkpoint as dcp

    final = Path(final)
    if final.exists():
        raise FileExistsError(f"{where}: {final} already exists; choose a new path (checkpoints are never replaced)")
    name = [str(temporary_name(final))]  # rank 0's name (its host and pid) for all ranks
    if distributed.dist_ready():
        import torch.distributed as dist

        dist.broadcast_object_list(name, src=0)
    tmp = Path(name[0])
    if distributed.rank() == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        reclaim_stale(final.parent)
    distributed.barrier()
    try:
        with warnings.catch_warnings():  # single process: DCP warns that it assumes one; it is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            try:
                dcp.save(state, checkpoint_id=tmp)
            except _dcp_errors() as e:
                raise _failure(where, final, "write", e) from None
        distributed.barrier()
        if distributed.rank() == 0:
            if extra is not None:
                extra(tmp)
            mode = umask_mode()
            for file in tmp.iterdir():
                os.chmod(file, mode)
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
            try:
                os.rename(tmp, final)  # a directory: fails if final exists and is not empty
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise FileExistsError(
                        f"{where}: {final} was created by another writer meanwhile; not replaced"
                    ) from None
                raise
            fsync_dir(final.parent)
    finally:
        if distributed.rank() == 0 and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # a failed save leaves nothing
    distributed.barrier()
    return final


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
