"""Power-EMA snapshot files: self-describing safetensors, written atomically.

One file per snapshot time, ``phema-<t>.safetensors``, holds every tracked profile of a
:class:`emakit.PowerEMA` at that time. Its metadata says everything reconstruction needs
(the time, each profile's ``sigma_rel`` and ``gamma``, names, dtypes, a format version), so
a directory of snapshots can be moved, merged or thinned out freely: nothing refers to the
object or the list of profiles that wrote it. Tensor keys:

- ``avg.<j>/<name>``: profile ``j``'s average of tensor ``name``;
- ``copy/<name>``: tensors that are copied, not averaged (``num_batches_tracked``);
- ``static/<name>``: tensors the EMA reads from the model (frozen parameters), when saved.

Files are written to a hidden temporary name in the same directory and renamed into place,
so a crash never leaves a file that is listed as a snapshot.

A sharded run (FSDP2, DeepSpeed ZeRO-3, ``shard=True``) writes ``phema-<t>.shards``, a
directory where each rank wrote only its own shards as ``rank-<r>.safetensors``, with the
same keys, and an ``emakit.json`` index holding the same metadata plus where every part
lies and its checksum (see :mod:`emakit._files.shards`): no pickle anywhere, so it reads
without trust. Sharded snapshots of earlier versions are ``phema-<t>.dcp``
``torch.distributed.checkpoint`` directories, whose ``.metadata`` is a pickle: they are
read only with ``trust=True``. All kinds are listed, read and reconstructed alike;
:func:`export` turns a sharded snapshot into the single-file form.

A single-file snapshot may be *compact* (header ``encoding="compact"``, see
:mod:`emakit._files.compact`): each ``avg.<j>/<name>`` is then a uint8 tensor of compressed
bytes, either a lossless fp32 keyframe or an int16 delta against the same tensor of the
snapshot at header ``reference`` (same directory). Readers decode transparently back to the
nearest keyframe, and keep the last decoded value of each average (one snapshot's averages,
of one directory, in fp32 on the CPU; :func:`clear_decoded_cache` frees it), so reading a
directory in time order decodes each file once.
"""

from __future__ import annotations

# Besides __all__, the names other modules read here: emakit.snapshots' names as before.
from ._files import limits as _limits
from ._files.header import (
    _DCP_INFO,  # noqa: F401
    ENCODINGS,
    FORMAT,
    VERSION,
    SnapshotError,
    SnapshotInfo,
    file_name,  # noqa: F401
    parse_dtype,  # noqa: F401
)
from ._files.snapshot_read import (
    _encoding,  # noqa: F401
    _safetensors,  # noqa: F401
    clear_decoded_cache,
    dcp_tensor_table,  # noqa: F401
    open_tensors,
    read_info,
    require_trust,
    shard_parts,
    snapshot_paths,
)
from ._files.snapshot_write import (
    KEYFRAME_INTERVAL,  # noqa: F401
    DeltaChain,  # noqa: F401
    export,
    rewrite_as_keyframe,
    write_sharded_snapshot,
    write_snapshot,
)

__all__ = [
    "ENCODINGS",
    "FORMAT",
    "VERSION",
    "SnapshotError",
    "SnapshotInfo",
    "clear_decoded_cache",
    "export",
    "open_tensors",
    "read_info",
    "require_trust",
    "rewrite_as_keyframe",
    "set_read_limits",
    "shard_parts",
    "snapshot_paths",
    "write_sharded_snapshot",
    "write_snapshot",
]


def set_read_limits(*, json_bytes: int | None = None) -> None:
    """Raise (or restore) the cap on the JSON files emakit reads: sharded-snapshot indexes, prune journals, checksums.

    Every such file must be a regular file (not a FIFO or device) of at most ``json_bytes``
    bytes (default 64 MiB, or the ``EMAKIT_MAX_JSON_BYTES`` environment variable, which the
    command line honours), and nest no deeper than Python's recursion limit allows; anything
    else is a :class:`SnapshotError` naming the file, so a hostile file cannot exhaust memory
    or block a reader. A real index takes about 100 bytes per tensor part (per rank), so only
    runs with hundreds of thousands of parts come near the default. ``json_bytes=None``
    restores the default.

        emakit.snapshots.set_read_limits(json_bytes=1 << 30)
    """
    _limits.set_json_bytes(json_bytes)
