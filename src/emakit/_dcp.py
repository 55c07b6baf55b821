"""Checkpoint directories in ``torch.distributed.checkpoint`` (DCP) format: atomic save, checked load.

Owns the DCP file I/O used by ``EMA.save`` / ``EMA.load`` and by sharded snapshots: a save
written under a hidden name and renamed by rank 0 once complete, the metadata read, and an
in-place load. DCP's metadata and small entries are pickled: read only what you trust.
Knows nothing about averages or snapshots (callers give it state dicts).
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import distributed
from ._atomic import fsync_dir


def save_atomic(
    where: str, state: dict[str, Any], final: Path, extra: Callable[[Path], None] | None = None
) -> Path:
    """``dcp.save(state)`` into a hidden directory that rank 0 renames to ``final`` once complete.

    Collective: every rank calls it with the same ``final`` (on a file system they share, as
    DCP requires). Each rank writes only its own shards. ``extra(tmp_dir)`` runs on rank 0
    before the rename (to add a small description file). A crash leaves only the hidden
    ``.<name>.tmp`` directory, which no reader lists; an existing ``final`` is never replaced.
    """
    import torch.distributed.checkpoint as dcp

    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    exists = final.exists()
    if exists:
        raise FileExistsError(f"{where}: {final} already exists; choose a new path (checkpoints are never replaced)")
    if distributed.rank() == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crashed save of the same name
    distributed.barrier()
    with warnings.catch_warnings():  # single process: DCP warns that it assumes one; it is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=tmp)
    distributed.barrier()
    if distributed.rank() == 0:
        if extra is not None:
            extra(tmp)
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    distributed.barrier()
    return final


def read_metadata(where: str, path: Path):
    """The DCP metadata of a checkpoint directory (pickled by DCP: load only checkpoints you trust)."""
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{where}: {path} is not a torch.distributed.checkpoint directory (no .metadata)")
    return FileSystemReader(str(path)).read_metadata()


def load(state: dict[str, Any], path: Path, *, no_dist: bool = False, flatten: bool = True) -> None:
    """``dcp.load`` in place (collective unless ``no_dist``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner

    planner = DefaultLoadPlanner(flatten_state_dict=flatten, flatten_sharded_tensors=flatten)
    with warnings.catch_warnings():  # DCP warns that a single process is assumed: that is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), planner=planner, no_dist=no_dist or not distributed.dist_ready())
