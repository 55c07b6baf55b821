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

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ._files import dcp as _dcp
from ._files import shards as _shard_files
from ._files.atomic import write_then_rename
from ._files.header import (
    _DCP_INFO,
    _DCP_PATTERN,
    _PATTERN,
    _SAFETENSORS_DTYPES,
    _SHARDS_PATTERN,
    ENCODINGS,
    FORMAT,
    VERSION,
    SnapshotError,
    SnapshotInfo,
    _metadata,
    _parse_info,
    checksum,
    dtype_name,
    file_name,
    parse_dtype,
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
    "shard_parts",
    "snapshot_paths",
    "write_sharded_snapshot",
    "write_snapshot",
]


def _encoding():
    """The compact codec, imported on first use (it needs numpy, which emakit itself does not)."""
    from ._files import compact as codec

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


def _final_path(directory: str | os.PathLike, t: float, suffix: str) -> Path:
    directory = Path(directory)
    for other in (".safetensors", ".shards", ".dcp"):
        path = directory / file_name(t, other)
        if path.exists():
            raise FileExistsError(f"save_snapshot: {path} already exists (a snapshot at t={t} was saved before)")
    return directory / file_name(t, suffix)


def write_snapshot(
    directory: str | os.PathLike,
    *,
    t: float,
    num_updates: int,
    sigma_rels: list[float],
    gammas: list[float],
    averages: list[dict[str, Tensor]],
    copies: dict[str, Tensor],
    static: dict[str, Tensor],
    model_dtypes: dict[str, torch.dtype],
    dtype: torch.dtype,
    keys: list[str],
    aliases: dict[str, str],
    chain: DeltaChain | None = None,
    replace: bool = False,
) -> Path:
    """Write one snapshot atomically; returns its path. Raises if that file already exists.

    With ``chain`` (a :class:`DeltaChain`) the averages are written compact: a delta
    against the chain's last snapshot, or a keyframe (see :meth:`DeltaChain.encode`).
    ``replace`` (for :func:`rewrite_as_keyframe` only) replaces the file at that time, whole.
    """
    safetensors, _ = _safetensors()
    Path(directory).mkdir(parents=True, exist_ok=True)
    final = Path(directory) / file_name(t) if replace else _final_path(directory, t, ".safetensors")
    tensors: dict[str, Tensor] = {}
    extra: dict[str, str] = {}
    if chain is not None:
        encoded, extra, commit = chain.encode(Path(directory), t, averages)
        tensors.update(encoded)
        averages = []

    def own(v: Tensor, to: torch.dtype | None = None) -> Tensor:
        # safetensors needs contiguous tensors that share no memory with each other.
        return v.detach().to(device="cpu", dtype=to or v.dtype, memory_format=torch.contiguous_format, copy=True)

    for j, profile in enumerate(averages):
        for name, v in profile.items():
            tensors[f"avg.{j}/{name}"] = own(v, dtype)
    for name, v in copies.items():
        tensors[f"copy/{name}"] = own(v)
    for name, v in static.items():
        tensors[f"static/{name}"] = own(v)
    metadata = _metadata(
        t=t,
        num_updates=num_updates,
        sigma_rels=sigma_rels,
        gammas=gammas,
        averaged=list(chain_names(averages, chain)),
        copied=list(copies),
        static=list(static),
        model_dtypes=model_dtypes,
        dtype=dtype,
        keys=keys,
        aliases=aliases,
    )
    metadata.update(extra)
    metadata["checksums"] = json.dumps({key: checksum(v) for key, v in tensors.items()})
    # Never replaces a snapshot, also one another writer saves meanwhile (FileExistsError).
    write_then_rename(
        [(final, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=metadata))], replace=replace
    )
    if chain is not None:
        commit()  # only once the file exists: a failed write leaves the chain where it was
    return final


def rewrite_as_keyframe(path: str | os.PathLike) -> Path:
    """Write a compact delta snapshot again, under its own name, as a keyframe: it then needs no reference.

    Lossless: the keyframe stores exactly the values the delta decodes to, so every snapshot
    written against this one still decodes to the same values. Atomic (the file is replaced
    whole). Snapshots that are no compact delta are left as they are. Memory: the snapshot's
    averages in fp32, once. Used by :func:`emakit.planning.prune` before it deletes a
    snapshot that a kept delta refers to.
    """
    info = read_info(path)
    if info.encoding != "compact" or info.reference is None:
        return info.path
    # A new chain's first snapshot is a keyframe.
    return write_snapshot(info.path.parent, **_read_all(info), chain=DeltaChain(), replace=True)


def _read_all(info: SnapshotInfo, trust: bool = False) -> dict:
    """Every tensor and header field of a snapshot, as :func:`write_snapshot`'s arguments (a copy of it)."""
    order = [f"avg.{j}/{n}" for j in range(info.num_profiles) for n in info.averaged]
    order += [f"copy/{n}" for n in info.copied] + [f"static/{n}" for n in info.static]
    reader = open_tensors(info, order, trust=trust)
    try:
        tensors = {key: reader.get(key) for key in order}
    except _dcp.CheckpointError as e:
        raise SnapshotError(str(e)) from None
    finally:
        reader.close()
    return dict(
        t=info.t,
        num_updates=info.num_updates,
        sigma_rels=list(info.sigma_rels),
        gammas=list(info.gammas),
        averages=[{n: tensors[f"avg.{j}/{n}"] for n in info.averaged} for j in range(info.num_profiles)],
        copies={n: tensors[f"copy/{n}"] for n in info.copied},
        static={n: tensors[f"static/{n}"] for n in info.static},
        model_dtypes=dict(info.model_dtypes),
        dtype=info.dtype,
        keys=list(info.keys),
        aliases=dict(info.aliases),
    )


def chain_names(averages: list[dict[str, Tensor]], chain: DeltaChain | None) -> list[str]:
    """Names of the averaged tensors (those of the chain's pending snapshot when writing compact)."""
    if chain is not None:
        return list(chain.pending_names)
    return list(averages[0]) if averages else []


#: Compact snapshots between two keyframes, the keyframe included (a reader decodes at most this many files).
KEYFRAME_INTERVAL = 32


@dataclass
class DeltaChain:
    """Writer state of compact snapshots: the last *decoded* averages, to encode the next delta against.

    Memory: one fp32 copy of every profile's averages, on the CPU. A new chain (a new or
    resumed PowerEMA) starts with a keyframe; so does a snapshot every
    ``keyframe_interval`` snapshots (bounding how far a reader decodes back), one to another
    directory, one whose reference file is gone, and one whose tensors changed.
    """

    keyframe_interval: int = KEYFRAME_INTERVAL
    directory: Path | None = None
    t: float | None = None
    length: int = 0  # snapshots since the keyframe, the keyframe included
    decoded: list[dict[str, Tensor]] = field(default_factory=list)
    pending_names: tuple[str, ...] = ()

    def _is_keyframe(self, directory: Path, averages: list[dict[str, Tensor]]) -> bool:
        if self.t is None or self.directory != directory.resolve() or self.length >= self.keyframe_interval:
            return True
        if not (directory / file_name(self.t)).is_file() or len(averages) != len(self.decoded):
            return True
        return any(
            a.keys() != d.keys() or any(a[n].shape != d[n].shape for n in a) for a, d in zip(averages, self.decoded)
        )

    def encode(self, directory: Path, t: float, averages: list[dict[str, Tensor]]):
        """``(tensors, header fields, commit)`` of the compact averages; ``commit()`` advances the chain."""
        keyframe = self._is_keyframe(directory, averages)
        tensors: dict[str, Tensor] = {}
        scales: dict[str, float] = {}
        shapes: dict[str, list[int]] = {}
        decoded: list[dict[str, Tensor]] = []
        for j, profile in enumerate(averages):
            decoded.append({})
            for name, v in profile.items():
                key = f"avg.{j}/{name}"
                shapes[key] = list(v.shape)
                if keyframe:
                    tensors[key] = _encoding().encode_keyframe(v)
                    decoded[j][name] = v.detach().to("cpu", torch.float32, copy=True)
                else:
                    tensors[key], scales[key], decoded[j][name] = _encoding().encode_delta(v, self.decoded[j][name])
        fields = {"encoding": "compact", "shapes": json.dumps(shapes)}
        if not keyframe:
            fields.update(reference=repr(float(self.t)), scales=json.dumps(scales))
        self.pending_names = tuple(averages[0]) if averages else ()

        def commit() -> None:
            self.directory, self.t, self.decoded = directory.resolve(), t, decoded
            self.length = 1 if keyframe else self.length + 1

        return tensors, fields, commit


def write_sharded_snapshot(
    directory: str | os.PathLike,
    *,
    averages: list[dict[str, Tensor]],
    copies: dict[str, Tensor],
    static: dict[str, Tensor],
    model_shapes: dict[str, tuple[int, ...]],
    container: str = "shards",
    **fields,
) -> Path:
    """Write one snapshot as a directory, each rank its own shards (collective).

    Same arguments as :func:`write_snapshot`; ``averages`` hold DTensors (or plain replicated
    tensors, written once) already in ``dtype``. ``model_shapes`` gives the model's shape of
    every tensor (a flattened ZeRO-3 average is stored 1-D and reshaped on reading).
    ``container="shards"`` (default) writes ``phema-<t>.shards`` (safetensors per rank and a
    JSON index, no pickle); ``"dcp"`` writes the earlier DCP form ``phema-<t>.dcp``, which
    readers open only with ``trust=True``.
    """
    if container not in ("shards", "dcp"):
        raise ValueError(f"save_snapshot: container must be 'shards' or 'dcp', got container={container!r}")
    final = _final_path(directory, fields["t"], f".{container}")
    state: dict[str, Tensor] = {}
    for j, profile in enumerate(averages):
        for name, v in profile.items():
            state[f"avg.{j}/{name}"] = v
    state.update({f"copy/{n}": v for n, v in copies.items()})
    state.update({f"static/{n}": v for n, v in static.items()})
    averaged = list(averages[0]) if averages else []
    metadata = _metadata(averaged=averaged, copied=list(copies), static=list(static), **fields)
    if container == "shards":
        write_part, write_index = _shard_files.writers(state, metadata, model_shapes)
        return _dcp.write_directory("save_snapshot", final, write_part, extra=write_index)
    metadata["tensors"] = json.dumps(
        {
            key: [dtype_name(v.dtype), list(v.shape), list(model_shapes[key.split("/", 1)[1]])]
            for key, v in state.items()
        }
    )

    def describe(tmp: Path) -> None:
        (tmp / _DCP_INFO).write_text(json.dumps(metadata, indent=1))

    return _dcp.save_atomic("save_snapshot", state, final, extra=describe)


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


def read_info(path: str | os.PathLike) -> SnapshotInfo:
    """Read and check a snapshot's header; :class:`SnapshotError` naming the file if it is not valid."""
    path = Path(path)
    if path.is_dir():
        return _read_dcp_info(path)
    _, safe_open = _safetensors()
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
            stored = {k: f.get_slice(k).get_dtype() for k in keys}
    except Exception as e:  # safetensors raises its own types for truncated / malformed files
        raise SnapshotError(f"{path}: not a readable safetensors file (truncated or corrupted?): {e}") from None
    info = _parse_info(path, meta, shapes, path.stat().st_size)
    for key in keys:
        if info.encoding == "compact" and key.startswith("avg."):
            if stored[key] != "U8" or len(shapes[key]) != 1:
                raise SnapshotError(f"{path}: compact tensor {key!r} is stored as {stored[key]}, expected U8 bytes")
        elif key.startswith("avg.") and _SAFETENSORS_DTYPES.get(stored[key]) != info.dtype:
            raise SnapshotError(
                f"{path}: tensor {key!r} is stored as {stored[key]}, but the header says the averages are "
                f"{dtype_name(info.dtype)} (corrupted or edited header?)"
            )
    return info


def _read_dcp_info(path: Path) -> SnapshotInfo:
    """The header of a sharded snapshot directory: a ``.shards`` one (its index checked), or a DCP one."""
    try:
        meta = json.loads((path / _DCP_INFO).read_text())
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("not an object of strings")
        tensors = json.loads(meta["tensors"])
        shapes = {k: tuple(v[2]) for k, v in tensors.items()}
        flat = tuple(sorted({k.split("/", 1)[1] for k, v in tensors.items() if list(v[1]) != list(v[2])}))
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise SnapshotError(
            f"{path}: not a readable sharded snapshot ({_DCP_INFO} missing or malformed: {e})"
        ) from None
    if path.suffix == ".shards" or "parts" in meta:
        _shard_files.Parts(path, meta)  # every part present, in bounds, covering each tensor
    elif not (path / ".metadata").is_file():
        raise SnapshotError(f"{path}: sharded snapshot without DCP .metadata (incomplete copy?)")
    nbytes = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
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
    return json.loads(json.loads((Path(path) / _DCP_INFO).read_text())["tensors"])


class _SafetensorsReader:
    """Reads tensors of a single-file snapshot, checking each against its header checksum."""

    def __init__(self, info: SnapshotInfo) -> None:
        _, safe_open = _safetensors()
        self._info = info
        self._file = safe_open(str(info.path), framework="pt")
        self._handle = self._file.__enter__()

    def raw(self, key: str) -> Tensor:
        """The stored tensor (compact averages: their encoded bytes), checked against its checksum."""
        value = self._handle.get_tensor(key)
        want = (self._info.checksums or {}).get(key)
        if want is not None and checksum(value) != want:
            raise SnapshotError(
                f"{self._info.path}: tensor {key!r} does not match its checksum: the file is corrupted "
                f"(a flipped bit, or data swapped between tensors)"
            )
        return value

    def get(self, key: str) -> Tensor:
        if self._info.encoding == "compact" and key.startswith("avg."):
            return _decode(self._info, key, self).clone()  # the cache keeps its own copy
        return self.raw(key)

    def close(self) -> None:
        self._file.__exit__(None, None, None)


#: Last decoded value of each compact average: ``key -> (file identity, fp32 tensor)``, of one directory.
_DECODED: dict[str, tuple[tuple, Tensor]] = {}
_DECODED_DIRECTORY: list[Path] = []  # the directory those values come from


def clear_decoded_cache() -> None:
    """Free the decoded averages kept while reading compact snapshots (at most one snapshot's worth)."""
    _DECODED.clear()
    _DECODED_DIRECTORY.clear()


def _identity(path: Path) -> tuple:
    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def _decode(info: SnapshotInfo, key: str, reader: _SafetensorsReader) -> Tensor:
    """Compact average ``key`` of ``info`` in fp32, decoding its references back to the keyframe as needed."""
    me = _identity(info.path)
    cached = _DECODED.get(key)
    if cached is not None and cached[0] == me:
        return cached[1]
    payload = reader.raw(key)
    reference = None if info.reference is None else _reference(info, key)
    try:
        if reference is None:
            value = _encoding().decode_keyframe(payload, info.shapes[key.split("/", 1)[1]])
        else:
            value = _encoding().decode_delta(payload, info.scales[key], reference)
    except (ValueError, zlib.error) as e:
        raise SnapshotError(f"{info.path}: compact tensor {key!r} cannot be decoded (corrupted?): {e}") from None
    directory = Path(me[0]).parent
    if _DECODED_DIRECTORY != [directory]:
        clear_decoded_cache()  # another directory: keep one directory's worth
        _DECODED_DIRECTORY.append(directory)
    _DECODED[key] = (me, value)
    return value


def _reference(info: SnapshotInfo, key: str) -> Tensor:
    """The decoded value of ``key`` in the snapshot ``info`` is relative to (from the cache, or decoded)."""
    path = info.path.parent / file_name(info.reference)
    if not path.is_file():
        raise SnapshotError(
            f"{info.path}: compact snapshot at t={info.t:g} is a delta against t={info.reference:g}, but its "
            f"reference {path.name} is missing from {info.path.parent}; keep every snapshot back to the "
            f"previous keyframe (or thin out only whole chains)"
        )
    cached = _DECODED.get(key)
    if cached is not None and cached[0] == _identity(path):
        return cached[1]
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
        self._parts = _shard_files.Parts(info.path, json.loads((info.path / _DCP_INFO).read_text()))

    def get(self, key: str) -> Tensor:
        value = self._parts.read(key)
        model_shape = self._parts.tensors[key][2]
        return value.view(model_shape) if tuple(value.shape) != model_shape else value

    def close(self) -> None:
        self._parts.close()


def shard_parts(info: SnapshotInfo) -> _shard_files.Parts:
    """The part table of a ``.shards`` snapshot (for readers that want a box of each tensor)."""
    return _shard_files.Parts(info.path, json.loads((info.path / _DCP_INFO).read_text()))


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
    return _SafetensorsReader(info)


def export(path: str | os.PathLike, directory: str | os.PathLike, *, trust: bool = False) -> Path:
    """Write a sharded snapshot (``.shards`` or DCP) as a single-file ``phema-<t>.safetensors`` in ``directory``.

    Runs in one process without a process group. The file holds the same tensors and
    metadata as a single-process snapshot: one file to keep, move or share. A DCP snapshot
    needs ``trust=True`` (its metadata is a pickle; DCP also promises no format compatibility
    across torch versions). Memory: the whole snapshot, once.
    """
    info = read_info(path)
    if not info.sharded:
        raise SnapshotError(f"{info.path}: already a single-file snapshot; nothing to export")
    require_trust(info, trust)
    return write_snapshot(directory, **_read_all(info, trust))
