"""Listing and reading snapshots: headers, tensors (checked and decoded), trust.

Owns what :mod:`emakit.snapshots` reads: the snapshots of a directory
(:func:`snapshot_paths`), a snapshot's checked header (:func:`read_info`, also of ``.shards``
and DCP directories), and a reader of its tensors (:func:`open_tensors`): single files
checked against their header checksums, compact averages decoded back to their keyframe
(keeping the last decoded value of each, :func:`clear_decoded_cache`), ``.shards``
directories part by part, DCP directories in batches and only with ``trust``
(:func:`require_trust`). Also the optional dependencies' loaders (safetensors, the compact
codec), imported on first use. Writes nothing.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import stat
import zlib
from pathlib import Path

import torch
from torch import Tensor

from . import checksums as _checksums
from . import dcp as _dcp
from . import limits as _limits
from . import read_ahead as _read_ahead
from . import shards as _shard_files
from .decoded import cached as _cached
from .decoded import clear_decoded_cache  # noqa: F401 (snapshots' and posthoc's)
from .decoded import file_at as _file_at
from .decoded import identity as _identity
from .decoded import remember as _remember
from .header import (
    _DCP_INFO,
    _DCP_PATTERN,
    _PATTERN,
    _SAFETENSORS_DTYPES,
    _SHARDS_PATTERN,
    SnapshotError,
    SnapshotInfo,
    _parse_info,
    dtype_name,
    parse_dtype,
    reads_previous,
)


def _encoding():
    """The compact codec, imported on first use (it needs numpy, which emakit itself does not)."""
    from . import compact as codec

    return codec


def _safetensors():
    try:
        import safetensors.torch  # noqa: F401
        from safetensors import safe_open
    except ImportError:
        raise ImportError(
            "snapshots need the safetensors package: pip install 'emakit[safetensors]' (or pip install safetensors)"
        ) from None
    return safetensors, safe_open


def snapshot_paths(directory: str | os.PathLike) -> list[Path]:
    """The snapshots of a directory (``phema-*.safetensors`` files, ``phema-*.shards`` / ``.dcp`` directories), by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SnapshotError(f"{directory}: not a directory")
    return sorted(
        p
        for p in directory.iterdir()
        if (_PATTERN.match(p.name) and p.is_file())
        or ((_DCP_PATTERN.match(p.name) or _SHARDS_PATTERN.match(p.name)) and p.is_dir())
    )


#: safetensors' name of each dtype it stores ("F32", "U8", ...).
_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


def read_info(path: str | os.PathLike) -> SnapshotInfo:
    """Read and check a snapshot's header; :class:`SnapshotError` naming the file if it is not valid."""
    path = Path(path)
    if path.is_dir():
        return _read_dcp_info(path)
    try:  # one parse of the header: the metadata, and where each tensor lies (kept for the readers)
        meta, table = _read_ahead.parse_header(path)
        shapes, stored = {k: v[1] for k, v in table.items()}, {k: _DTYPE_NAMES[v[0]] for k, v in table.items()}
    except SnapshotError:  # what safetensors says of it, or it reads what that parser does not know
        table = None
        meta, shapes, stored = _read_with_safetensors(path)
    info = _parse_info(path, meta, shapes, path.stat().st_size)
    for key in shapes:
        if info.encoding == "compact" and key.startswith("avg."):
            if stored[key] != "U8" or len(shapes[key]) != 1:
                raise SnapshotError(f"{path}: compact tensor {key!r} is stored as {stored[key]}, expected U8 bytes")
            _check_claimed(path, key, info.shapes[key.split("/", 1)[1]], shapes[key][0])
        elif key.startswith("avg.") and _SAFETENSORS_DTYPES.get(stored[key]) != info.dtype:
            raise SnapshotError(
                f"{path}: tensor {key!r} is stored as {stored[key]}, but the header says the averages are "
                f"{dtype_name(info.dtype)} (corrupted or edited header?)"
            )
    return info if table is None else dataclasses.replace(info, stored=table)


def _read_with_safetensors(path: Path) -> tuple[dict, dict, dict]:
    """The metadata, shapes and stored dtype names of a safetensors file, as safetensors reads them."""
    _, safe_open = _safetensors()
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            return f.metadata() or {}, {k: tuple(f.get_slice(k).get_shape()) for k in keys}, \
                {k: f.get_slice(k).get_dtype() for k in keys}  # fmt: skip
    except Exception as e:  # safetensors raises its own types for truncated / malformed files
        raise SnapshotError(f"{path}: not a readable safetensors file (truncated or corrupted?): {e}") from None


#: No compressor a compact snapshot uses expands its bytes more than this (zlib: about 1032).
_MAX_INFLATION = 1 << 16


def _check_claimed(path: Path, key: str, shape: tuple, payload: int) -> None:
    """A compact average's model shape is one its payload can hold: a header cannot claim terabytes."""
    if any(n < 0 for n in shape) or 4 * math.prod(shape) > _MAX_INFLATION * payload + (1 << 20):
        raise SnapshotError(
            f"{path}: the header says compact tensor {key!r} has shape {list(shape)}, more than its {payload} "
            f"bytes can hold (a damaged or edited header)"
        )


def _check_index_bytes(path: Path, tensors: dict, nbytes: int) -> None:
    """The shapes a sharded snapshot's index claims are backed by the bytes of its directory."""
    try:
        stored = [(parse_dtype(str(v[0]), str(path)).itemsize, [int(n) for n in v[1]]) for v in tensors.values()]
    except (ValueError, TypeError, IndexError) as e:
        raise SnapshotError(f"{path}: not a readable sharded snapshot ({_DCP_INFO} malformed: {e})") from None
    claimed = sum(size * math.prod(shape) for size, shape in stored)
    if claimed > nbytes or any(n < 0 for _, shape in stored for n in shape):
        raise SnapshotError(
            f"{path}: its index claims {claimed} bytes of tensors, but the directory holds {nbytes} bytes "
            f"(a damaged or edited index)"
        )


def _read_dcp_info(path: Path) -> SnapshotInfo:
    """The header of a sharded snapshot directory: a ``.shards`` one (its index checked), or a DCP one."""
    try:
        meta = _limits.read_json(path / _DCP_INFO)  # a regular file, capped in size and nesting
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("not an object of strings")
        tensors = _limits.loads(meta["tensors"])
        shapes = {k: tuple(v[2]) for k, v in tensors.items()}
        flat = tuple(sorted({k.split("/", 1)[1] for k, v in tensors.items() if list(v[1]) != list(v[2])}))
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise SnapshotError(
            f"{path}: not a readable sharded snapshot ({_DCP_INFO} missing or malformed: {e})"
        ) from None
    if path.suffix == ".shards" or "parts" in meta:
        _shard_files.Parts(path, meta)  # every part present, in bounds, covering each tensor
    elif not (path / ".metadata").is_file():
        raise SnapshotError(f"{path}: sharded snapshot without DCP .metadata (incomplete copy?)")
    nbytes = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    _check_index_bytes(path, tensors, nbytes)
    info = _parse_info(path, meta, shapes, nbytes)
    stored = {tensors[k][0] for k in tensors if k.startswith("avg.")}
    if stored - {dtype_name(info.dtype)}:
        raise SnapshotError(
            f"{path}: averages stored as {sorted(stored)}, but the header says {dtype_name(info.dtype)} "
            f"(corrupted or edited index?)"
        )
    return SnapshotInfo(**{**info.__dict__, "sharded": True, "flat": flat})


# --------------------------------------------------------------------------- reading tensors

#: Bytes of tensors read from a sharded snapshot per ``dcp.load`` call (each call re-reads its metadata).
_DCP_BATCH_BYTES = 64 << 20


def dcp_tensor_table(path: Path) -> dict[str, list]:
    """``key -> [dtype name, stored shape, model shape]`` of a sharded snapshot."""
    return _limits.loads(_index(Path(path))["tensors"])


def _index(path: Path) -> dict:
    """The index ``emakit.json`` of a sharded snapshot (bounded like every JSON file read)."""
    try:
        return _limits.read_json(path / _DCP_INFO)
    except (OSError, ValueError) as e:
        raise SnapshotError(f"{path}: not a readable sharded snapshot ({_DCP_INFO}: {e})") from None


class _SafetensorsReader:
    """Reads tensors of a single-file snapshot, checking each against its header checksum."""

    def __init__(self, info: SnapshotInfo, order: list[str] | None = None) -> None:
        _, safe_open = _safetensors()
        self._info, self._order, self._position = info, list(order or ()), None
        self._together: set[str] = set()  # keys decoded in a batch already (or being decoded)
        self._known: dict = {}  # the files its deltas read, found once (:func:`_file_at`)
        self._layouts: dict = {}  # where each tensor lies (:meth:`raw_many`)
        self._file = safe_open(str(info.path), framework="pt")
        self._handle = self._file.__enter__()

    def _check(self, key: str, data) -> None:
        """``data`` (a tensor or bytes) against ``key``'s checksum in the header, if it has one."""
        if self._info.checksums is not None:
            data = _checksums.buffer_of(data.contiguous()) if isinstance(data, Tensor) else data
            _read_ahead._check(self._info, key, _checksums.extend(0, data, self._info.checksum_algorithm))

    def raw(self, key: str) -> Tensor:
        """The stored tensor (compact averages: their encoded bytes), checked against its checksum."""
        value = self._handle.get_tensor(key)
        self._check(key, value)
        return value

    def raw_many(self, keys: list[str]) -> list:
        """What :meth:`raw` gives for each of ``keys`` (as memoryviews of the bytes), in one read of the span they
        lie in where they lie close together (a tensor read through safetensors costs some 15 us)."""
        try:
            table = _read_ahead.layout(self._info, self._layouts) if len(keys) > 1 else {}
            entries = [table[key][2:] for key in keys]  # (file offset, bytes)
        except (SnapshotError, KeyError):
            return [self.raw(key) for key in keys]  # (raw names the problem)
        start, end = min(e[0] for e in entries), max(e[0] + e[1] for e in entries)
        if end - start > 2 * sum(e[1] for e in entries) + (1 << 20):
            return [self.raw(key) for key in keys]
        data = memoryview(bytearray(end - start))
        _read_ahead._pread(self._info, {}, data, start)  # (a short file: a SnapshotError naming it)
        out = [data[offset - start : offset - start + nbytes] for offset, nbytes in entries]
        for key, payload in zip(keys, out):
            self._check(key, payload)
        return out

    def get(self, key: str) -> Tensor:
        if self._info.encoding == "compact" and key.startswith("avg."):
            if self._order and self._info.reference is not None and key not in self._together:
                keys = self._upcoming(key)
                self._together.update(keys)
                _decode_together(self._info, keys, self, self._known)
            value = _decode(self._info, key, self, self._known)  # flat: the cache keeps its own copy
            return value.clone().view(self._info.shapes[key.split("/", 1)[1]])
        return self.raw(key)

    def _upcoming(self, key: str) -> list[str]:
        """``key`` and the averages of its profile asked for after it, up to a batch of elements in all."""
        if self._position is None:
            self._position = {k: i for i, k in enumerate(self._order)}
        start, profile, shapes = self._position.get(key), key.split("/", 1)[0] + "/", self._info.shapes
        keys, total, limit = [], 0, _encoding().BATCH_NUMEL
        after = range(start + 1, len(self._order)) if start is not None else ()
        for other in itertools.chain([key], (self._order[i] for i in after)):
            shape = shapes.get(other.split("/", 1)[1]) if other.startswith(profile) else None
            if total >= limit or (shape is None and other.startswith("avg.")):
                break  # (another profile's deltas may be predicted from this one's: decoded after it)
            if shape is not None:
                keys.append(other)
                total += math.prod(shape)
        return keys

    def close(self) -> None:
        self._file.__exit__(None, None, None)


def _decode(info: SnapshotInfo, key: str, reader: _SafetensorsReader, known: dict | None = None) -> Tensor:
    """Compact average ``key`` of ``info`` in fp32 (flat), decoding its references back to the keyframe as needed."""
    if info.reference is not None:
        return _decode_together(info, [key], reader, known)[0]
    me = _file_at(info, info.t, known)[1] or _identity(info.path)  # (gone since opened: the stat raises)
    cached = _cached(key, me)
    if cached is not None:
        return cached
    payload = reader.raw(key)
    try:
        value = _encoding().decode_keyframe(payload, info.shapes[key.split("/", 1)[1]]).view(-1)
    except (ValueError, zlib.error) as e:
        raise SnapshotError(f"{info.path}: compact tensor {key!r} cannot be decoded (corrupted?): {e}") from None
    _remember(info, [(key, value)], me)
    return value


def _decode_together(info: SnapshotInfo, keys: list[str], reader: _SafetensorsReader, known: dict | None) -> list:
    """The values (fp32, flat) of the deltas ``keys`` of ``info`` (one profile): those not cached yet are decoded with
    one set of tensor operations (:func:`~emakit._files.compact.decode_deltas`: the same bits as one at a time),
    and cached."""
    me = _file_at(info, info.t, known)[1] or _identity(info.path)  # (gone since opened: the stat raises)
    values = [_cached(key, me) for key in keys]
    todo = [key for key, value in zip(keys, values) if value is None]
    if not todo:
        return values
    codec, references, columns, coefficients = _encoding(), [], [], []
    payloads = reader.raw_many(todo)
    for key in todo:
        references.append(_earlier(info, info.reference, key, known))
        coefficients.append((info.predictors or {}).get(key, ()))
        columns.append(_predictors(info, key, references[-1], coefficients[-1], reader, known))
    try:
        decoded = codec.decode_deltas(
            payloads, [info.scales[k] for k in todo], references, predictors=columns, coefficients=coefficients
        )
    except codec.PayloadError as e:
        raise SnapshotError(f"{info.path}: compact tensor {todo[e.index]!r} cannot be decoded (corrupted?): {e}") from None
    _remember(info, list(zip(todo, decoded)), me)
    fresh = iter(decoded)
    return [value if value is not None else next(fresh) for value in values]


def _predictors(
    info: SnapshotInfo, key: str, reference: Tensor, coefficients, reader: _SafetensorsReader, known: dict | None
) -> list:
    """What a delta of profile ``j`` is predicted from (as the writer's ``DeltaChain``): the increments since the
    reference of the profiles before ``j``, then (:func:`reads_previous`) its own increment the time before."""
    if not coefficients:
        return []
    j, name = int(key.split("/", 1)[0][4:]), key.split("/", 1)[1]
    columns = []
    for k in range(j):
        lower = f"avg.{k}/{name}"
        columns.append((_decode(info, lower, reader, known), _earlier(info, info.reference, lower, known)))
    if reads_previous(key, coefficients):
        columns.append((reference, _earlier(info, info.previous, key, known)))
    return columns  # pairs (m, s) standing for m - s, subtracted as the decoder needs them


def _earlier(info: SnapshotInfo, t: float, key: str, known: dict | None = None) -> Tensor:
    """The decoded value of ``key`` in the earlier snapshot at ``t`` that ``info``'s delta needs (its reference, or
    the reference's reference): from the cache, or decoded."""
    path, identity = _file_at(info, t, known)
    if identity is None or not stat.S_ISREG(identity[4]):
        role = "reference" if t == info.reference else "reference's reference (its prediction reads it)"
        raise SnapshotError(
            f"{info.path}: compact snapshot at t={info.t:g} is a delta against t={info.reference:g}, but its "
            f"{role} {path.name} is missing from {info.path.parent}; keep every snapshot back to the "
            f"previous keyframe (or thin out only whole chains)"
        )
    cached = _cached(key, identity)
    if cached is not None:
        return cached
    ref = read_info(path)
    if ref.encoding != "compact" or ref.shapes.get(key.split("/", 1)[1]) != info.shapes[key.split("/", 1)[1]]:
        raise SnapshotError(
            f"{info.path}: its reference {path.name} is not a compact snapshot of the same tensors "
            f"(encoding={ref.encoding!r}); expected the snapshot this one was written against"
        )
    reader = _SafetensorsReader(ref)
    try:
        return _decode(ref, key, reader)
    finally:
        reader.close()


class _DcpReader:
    """Reads a sharded snapshot in one process, a batch of upcoming tensors per ``dcp.load``."""

    def __init__(self, info: SnapshotInfo, order: list[str]) -> None:
        self._info = info
        self._tensors = dcp_tensor_table(info.path)
        self._order = order
        self._cache: dict[str, Tensor] = {}

    def _empty(self, key: str) -> Tensor:
        dtype, shape, _ = self._tensors[key]
        return torch.empty(shape, dtype=parse_dtype(dtype, str(self._info.path)))

    def get(self, key: str) -> Tensor:
        if key not in self._cache:
            start = self._order.index(key) if key in self._order else len(self._order)
            batch = {key: self._empty(key)}
            nbytes = batch[key].nbytes
            for other in self._order[start + 1 :]:
                if nbytes >= _DCP_BATCH_BYTES:
                    break
                batch[other] = self._empty(other)
                nbytes += batch[other].nbytes
            _dcp.load(batch, self._info.path, no_dist=True, flatten=False, where="read snapshot")
            self._cache = batch
        value = self._cache.pop(key)
        model_shape = self._tensors[key][2]
        return value.view(model_shape) if list(value.shape) != list(model_shape) else value

    def close(self) -> None:
        self._cache.clear()


class _ShardsReader:
    """Reads whole tensors of a ``.shards`` snapshot in one process, each part checked against its checksum."""

    def __init__(self, info: SnapshotInfo) -> None:
        self._info = info
        self._parts = _shard_files.Parts(info.path, _index(info.path))

    def get(self, key: str) -> Tensor:
        value = self._parts.read(key)
        model_shape = self._parts.tensors[key][2]
        return value.view(model_shape) if tuple(value.shape) != model_shape else value

    def close(self) -> None:
        self._parts.close()


def shard_parts(info: SnapshotInfo) -> _shard_files.Parts:
    """The part table of a ``.shards`` snapshot (for readers that want a box of each tensor)."""
    return _shard_files.Parts(info.path, _index(info.path))


def require_trust(info: SnapshotInfo, trust: bool) -> None:
    """Refuse to read a DCP (``.dcp``) snapshot unless the caller vouches for it: its metadata is a pickle."""
    if info.pickled and not trust:
        raise SnapshotError(
            f"{info.path}: a sharded (DCP) snapshot, whose .metadata is a pickle: reading it can run code. Pass "
            f"trust=True (CLI: --trust) if you wrote it, and export it once to safetensors (emakit export --trust)"
        )


def open_tensors(info: SnapshotInfo, order: list[str] | None = None, *, trust: bool = False):
    """A reader with ``get(key) -> Tensor`` (model-shaped, on the CPU) and ``close()``.

    ``order`` lists the keys in the order they will be asked for, so a sharded snapshot can
    read them in batches; reading is streamed: one batch in memory at a time. A DCP
    (``.dcp``) snapshot is read only with ``trust=True``: DCP's metadata is a pickle.
    """
    require_trust(info, trust)
    if info.pickled:
        return _DcpReader(info, list(order or []))
    if info.sharded:
        return _ShardsReader(info)
    return _SafetensorsReader(info, order)
