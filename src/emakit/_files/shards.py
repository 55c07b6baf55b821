"""Sharded snapshots without pickle: one safetensors file per rank and a JSON index.

Owns the ``phema-<t>.shards`` directory that a sharded run (FSDP2, DeepSpeed ZeRO-3,
``shard=True``) writes. Each rank writes ``rank-<r>.safetensors`` with the parts of the
tensors it owns: a DTensor's local shard (once per replica group), a plain replicated
tensor only on rank 0. Rank 0 then writes ``emakit.json``: the snapshot header, each
tensor's dtype and shapes, and every part (file, offset in the global tensor, shape,
checksum: CRC-32, or CRC-32C where the index names it as ``checksum_algorithm``). Nothing in the directory is code, so it is safe to read from anyone, unlike DCP's
pickled ``.metadata``. Readers assemble whole tensors in one process, or only the box a
rank needs; every part is checked against its checksum, shape and dtype, and the index
must cover every tensor exactly once.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import Tensor

from .. import distributed
from . import checksums as _checksums
from . import limits as _limits
from .header import _DCP_INFO, SnapshotError, checksum, checksum_algorithm, dtype_name, parse_dtype

__all__ = ["INDEX", "Parts", "writers"]

INDEX = _DCP_INFO  # ``emakit.json``, as in a DCP snapshot
_PART_FILE = re.compile(r"^rank-[0-9]{5}\.safetensors$")


def _safetensors():
    try:
        import safetensors.torch
        from safetensors import safe_open
    except ImportError:
        raise ImportError("snapshots are safetensors files: pip install safetensors (or 'emakit[snapshots]')") from None
    return safetensors.torch, safe_open


def _local_part(value: Tensor) -> tuple[Tensor, list[int]] | None:
    """This rank's part of ``value`` and its offset in the global tensor; None where another rank writes it."""
    if distributed.is_dtensor(value):
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        mesh = value.device_mesh
        coordinate = mesh.get_coordinate()
        if coordinate is None:
            return None  # this rank is not in the tensor's mesh
        if any(isinstance(p, Replicate) and c != 0 for p, c in zip(value.placements, coordinate)):
            return None  # a replica: the first one of its group writes
        shape, offset = compute_local_shape_and_global_offset(value.shape, mesh, value.placements)
        local = value.to_local()
        if tuple(local.shape) != tuple(shape):
            raise ValueError(f"save_snapshot: a local shard of shape {tuple(local.shape)}, expected {tuple(shape)}")
        return local, list(offset)
    if distributed.rank() != 0:
        return None
    return value, [0] * value.dim()


def writers(state: dict[str, Tensor], metadata: dict[str, str], model_shapes: dict[str, tuple]) -> tuple:
    """``(write_part, write_index)`` for ``state`` (key -> DTensor or replicated tensor) (collective).

    ``write_part(tmp)`` writes this rank's file into directory ``tmp``; ``write_index(tmp)``,
    on rank 0 once every rank has written, the index. The parts are copied to the CPU and
    their checksums taken (and gathered to every rank) here, before either runs.
    """
    safetensors, _ = _safetensors()
    parts: dict[str, tuple[Tensor, list[int]]] = {}
    for key, value in state.items():
        part = _local_part(value)
        if part is not None and part[0].numel():
            # safetensors needs contiguous CPU tensors that share no memory with each other.
            local = part[0].detach().to(device="cpu", memory_format=torch.contiguous_format, copy=True)
            parts[key] = (local, part[1])
    algorithm = distributed.all_gather_object(_checksums.preferred())[0]  # rank 0's, on every rank
    digests = {key: _checksums.submit(t, algorithm) for key, (t, _) in parts.items()}
    table = {key: [offset, list(t.shape), digests[key].result()] for key, (t, offset) in parts.items()}
    files = {f"rank-{r:05d}.safetensors": t for r, t in enumerate(distributed.all_gather_object(table)) if t}
    mine = f"rank-{distributed.rank():05d}.safetensors"

    def write_part(tmp: Path) -> None:
        if parts:
            tensors = {key: t for key, (t, _) in parts.items()}
            safetensors.save_file(tensors, str(tmp / mine), metadata={"parts": json.dumps(table)})

    def write_index(tmp: Path) -> None:
        index = dict(metadata)
        index["tensors"] = json.dumps(
            {k: [dtype_name(v.dtype), list(v.shape), list(model_shapes[k.split("/", 1)[1]])] for k, v in state.items()}
        )
        index["parts"] = json.dumps(files)
        if algorithm != _checksums.LEGACY:
            index["checksum_algorithm"] = algorithm
        (tmp / INDEX).write_text(json.dumps(index, indent=1))

    return write_part, write_index


class Parts:
    """The parts of a ``.shards`` directory, from its index: checked on construction, read on demand."""

    def __init__(self, path: Path, index: dict) -> None:
        self.path = Path(path)
        try:
            self.tensors = {k: (v[0], tuple(int(n) for n in v[1]), tuple(int(n) for n in v[2]))
                            for k, v in _limits.loads(index["tensors"]).items()}  # fmt: skip
            files = _limits.loads(index["parts"])
            self.parts: dict[str, list[tuple[str, tuple, tuple, str]]] = {k: [] for k in self.tensors}
            for file, table in files.items():
                for key, (offset, shape, crc) in table.items():
                    self.parts[key].append((file, tuple(int(n) for n in offset), tuple(int(n) for n in shape), crc))
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
            raise SnapshotError(
                f"{self.path}: sharded snapshot index {INDEX} is malformed ({type(e).__name__}: {e})"
            ) from None
        self._check(files)
        self.algorithm = checksum_algorithm(self.path, index)
        self._open: dict[str, object] = {}

    def _check(self, files: dict) -> None:
        """Every file is a part file that exists; every tensor is covered by in-bounds parts, element for element."""
        for file in files:
            if not _PART_FILE.match(file) or not (self.path / file).is_file():
                raise SnapshotError(f"{self.path}: the index names part {file!r}, which is missing (incomplete copy?)")
        for key, (dtype, stored, model) in self.tensors.items():
            parse_dtype(dtype, str(self.path))
            if math.prod(stored) != math.prod(model):
                raise SnapshotError(f"{self.path}: tensor {key!r} is stored as {stored}, not a shape of {model}")
            covered = 0
            for file, offset, shape, _ in self.parts[key]:
                if (
                    len(offset) != len(stored)
                    or len(shape) != len(stored)
                    or any(o < 0 or n < 0 or o + n > s for o, n, s in zip(offset, shape, stored))
                ):
                    raise SnapshotError(f"{self.path}: part of {key!r} in {file} lies outside its shape {stored}")
                covered += math.prod(shape)
            if covered != math.prod(stored):
                raise SnapshotError(
                    f"{self.path}: the parts of {key!r} cover {covered} of its {math.prod(stored)} elements "
                    f"(a rank's file missing from the index, or a damaged index)"
                )
        self._check_sizes(files)

    def _check_sizes(self, files: dict) -> None:
        """The parts a file is said to hold fit in it: shapes an index claims are backed by bytes on disk."""
        claimed = dict.fromkeys(files, 0)
        for key, entries in self.parts.items():
            itemsize = parse_dtype(self.tensors[key][0], str(self.path)).itemsize
            for file, _, shape, _ in entries:
                claimed[file] += itemsize * math.prod(shape)
        for file, nbytes in claimed.items():
            size = (self.path / file).stat().st_size
            if nbytes > size:
                raise SnapshotError(
                    f"{self.path / file}: not a readable part: the index says it holds {nbytes} bytes of tensors, "
                    f"it has {size} bytes (truncated, or a damaged or edited index)"
                )

    def _read(self, file: str, key: str, shape: tuple, crc: str, dtype: torch.dtype) -> Tensor:
        handle = self._open.get(file)
        if handle is None:
            _, safe_open = _safetensors()
            try:
                handle = safe_open(str(self.path / file), framework="pt").__enter__()
            except Exception as e:  # safetensors' own error types for truncated or malformed files
                raise SnapshotError(f"{self.path / file}: not a readable safetensors file (truncated?): {e}") from None
            self._open[file] = handle
        try:
            value = handle.get_tensor(key)
        except Exception as e:
            raise SnapshotError(
                f"{self.path / file}: cannot read tensor {key!r} (truncated or damaged?): {e}"
            ) from None
        if tuple(value.shape) != shape or value.dtype != dtype or checksum(value, self.algorithm) != crc:
            raise SnapshotError(
                f"{self.path / file}: tensor {key!r} does not match its checksum, shape or dtype in the index: "
                f"the file is corrupted"
            )
        return value

    def read(self, key: str, offset: tuple | None = None, shape: tuple | None = None) -> Tensor:
        """The box ``[offset, offset + shape)`` of stored tensor ``key`` (all of it by default), in its stored shape."""
        dtype_str, stored, _ = self.tensors[key]
        dtype = parse_dtype(dtype_str, str(self.path))
        offset = tuple(offset) if offset is not None else (0,) * len(stored)
        shape = tuple(shape) if shape is not None else stored
        out = torch.empty(shape, dtype=dtype)
        if out.numel() == 0:
            return out
        for file, part_offset, part_shape, crc in self.parts[key]:
            lo = [max(a, b) for a, b in zip(offset, part_offset)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(offset, shape, part_offset, part_shape)]
            if any(h <= low for low, h in zip(lo, hi)):
                continue
            value = self._read(file, key, part_shape, crc, dtype)
            src = value[tuple(slice(a - p, b - p) for a, b, p in zip(lo, hi, part_offset))]
            out[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offset))] = src
        return out

    def close(self) -> None:
        for handle in self._open.values():
            handle.__exit__(None, None, None)
        self._open.clear()
