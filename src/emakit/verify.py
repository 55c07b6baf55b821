"""Checking snapshots and checkpoints without a model (``emakit verify``).

Owns the checks of files at rest: power-EMA snapshots (``phema-<t>.safetensors`` files,
``phema-<t>.shards`` / ``.dcp`` directories and directories of them), reconstructions written by
``emakit reconstruct``, and checkpoints of an average (``EMA.state_dict()`` saved with
``torch.save``, read with ``weights_only=True``; ``EMA.save`` DCP directories). Every
header is parsed and every tensor read, once, one at a time (a batch at a time from a DCP
folder): it must have the shape and dtype its header promises, averages must be floating,
and every floating tensor finite. Snapshot tensors are read through
:func:`emakit.snapshots.open_tensors`, which verifies whatever that format lets it verify.

DCP folders hold a pickled ``.metadata``: they are read only with ``trust=True``.

    problems = verify(["run/phema", "run/ema.pt"])     # [] when all is well
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import posthoc, snapshots
from ._engine.checkpoint import STATE_VERSION
from ._engine.clock import check_time
from ._files import collector as _collector
from ._files import dcp as _dcp
from ._files.snapshot_check import _first_line, _named, _names, _read_errors, check_snapshots

__all__ = ["CHECKPOINT_FORMATS", "needs_trust", "verify"]

#: ``state_dict()["format"]`` of the averages whose checkpoints are checked.
CHECKPOINT_FORMATS = ("emakit.EMA", "emakit.PowerEMA")
#: ``format`` metadata of the files ``emakit reconstruct`` writes.
RECONSTRUCTION_FORMAT = "emakit.ema"

_DCP_SNAPSHOT = "sharded (DCP) snapshot"
_SHARDS_SNAPSHOT = "sharded snapshot"
_DCP_CHECKPOINT = "DCP checkpoint (EMA.save)"
#: Bytes of checkpoint tensors read from a DCP folder per ``dcp.load`` call.
_BATCH_BYTES = 256 << 20
#: safetensors' own cap on a header's size: a larger length field is damage (never read).
_MAX_HEADER = 100_000_000


@_collector.paused()
def verify(paths: Iterable[str | os.PathLike], *, trust: bool = False) -> list[str]:
    """The problems found in ``paths``, one line each (``"<path>: <problem>"``); ``[]`` when all is well.

    Each path is a snapshot directory, a snapshot (file, ``.shards`` or ``.dcp`` directory), a
    reconstruction, or a checkpoint (``torch.save(ema.state_dict())`` file or ``ema.save``
    directory). DCP folders are read only with ``trust=True`` (their metadata is a pickle);
    without it, :class:`emakit.snapshots.SnapshotError` names the first one before anything
    is read. Memory: one tensor (one batch from a DCP folder) at a time, except a
    ``torch.save`` checkpoint, which is memory-mapped.
    """
    paths = [Path(p) for p in paths]
    if not trust:
        untrusted = needs_trust(paths)
        if untrusted:
            path, kind = untrusted[0]
            raise snapshots.SnapshotError(
                f"{path}: a {kind}, whose .metadata is a pickle: reading it can run code; pass trust=True if you wrote it"
            )
    problems: list[str] = []
    for path in paths:
        problems += _check_path(path)
    return problems


def needs_trust(paths: Iterable[str | os.PathLike]) -> list[tuple[Path, str]]:
    """The DCP folders that checking ``paths`` would read, each with what it is (nothing is read)."""
    found = []
    for path in (Path(p) for p in paths):
        kind = _kind(path)
        if kind in (_DCP_SNAPSHOT, _DCP_CHECKPOINT):
            found.append((path, kind))
        elif kind == "directory":
            try:
                found += [(p, _DCP_SNAPSHOT) for p in snapshots.snapshot_paths(path) if p.suffix == ".dcp"]
            except (OSError, snapshots.SnapshotError):
                pass  # reported when checked
    return found


def _kind(path: Path) -> str | None:
    if not path.is_dir():
        return "file" if path.exists() else None
    if path.name.startswith("phema-") and path.suffix == ".shards":
        return _SHARDS_SNAPSHOT
    if (path / snapshots._DCP_INFO).exists() or (path.name.startswith("phema-") and path.suffix == ".dcp"):
        return _DCP_SNAPSHOT
    if (path / ".metadata").exists():
        return _DCP_CHECKPOINT
    return "directory"


def _check_path(path: Path) -> list[str]:
    try:
        kind = _kind(path)
        if kind is None:
            return [f"{path}: no such file or directory"]
        if kind == "file" and not path.is_file():
            return [f"{path}: not a regular file (a FIFO, device or socket?); nothing read"]
        if kind in (_DCP_SNAPSHOT, _SHARDS_SNAPSHOT):
            return _check_snapshot(path)
        if kind == _DCP_CHECKPOINT:
            return _check_dcp_checkpoint(path)
        if kind == "directory":
            return _check_directory(path)
        return _check_file(path)
    except OSError as e:
        return [f"{path}: cannot read: {e.strerror or e}"]


# --------------------------------------------------------------------------- snapshots


def _check_directory(path: Path) -> list[str]:
    paths = snapshots.snapshot_paths(path)
    if not paths:
        return [
            f"{path}: no snapshots (phema-*.safetensors files, phema-*.shards or .dcp directories) in this directory"
        ]
    checks = check_snapshots(paths)
    problems = [line for check in checks for line in check.problems()]
    if not problems:  # each one is fine: do they come from one run?
        try:
            posthoc._check_same_run(sorted((c.info for c in checks), key=lambda info: info.t))
        except snapshots.SnapshotError as e:
            problems.append(_named(path, e))
    return problems


def _check_snapshot(path: Path) -> list[str]:
    return check_snapshots([path])[0].problems()


# --------------------------------------------------------------------------- single files


def _safetensors_header(path: Path) -> dict | None:
    """The JSON header of a safetensors file, ``{}`` if it looks like one but the header is unreadable, else None."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return {} if path.suffix == ".safetensors" else None
        length = int.from_bytes(head, "little")
        first = f.read(1)
        if first != b"{":
            return {} if path.suffix == ".safetensors" else None
        if length > min(size - 8, _MAX_HEADER):
            return {}
        try:
            header = json.loads(first + f.read(length - 1))
        except (ValueError, RecursionError):
            return {}
    return header if isinstance(header, dict) else {}


def _check_file(path: Path) -> list[str]:
    header = _safetensors_header(path)
    if header is not None:
        fmt = (header.get("__metadata__") or {}).get("format")
        if fmt == snapshots.FORMAT or (not header and path.name.startswith("phema-")):
            return _check_snapshot(path)
        if not header:
            return [f"{path}: not a readable safetensors file (truncated or corrupted header)"]
        if fmt == RECONSTRUCTION_FORMAT:
            return _check_reconstruction(path)
        return [
            f"{path}: not an emakit file: a safetensors file with format={fmt!r}, expected "
            f"{snapshots.FORMAT!r} (a snapshot) or {RECONSTRUCTION_FORMAT!r} (a reconstruction)"
        ]
    with open(path, "rb") as f:
        head = f.read(4)
    zipped = head == b"PK\x03\x04"  # torch.save's format since 1.6 (memory-mapped); before it, a pickle
    if not (zipped or head[:1] == b"\x80"):
        return [f"{path}: not an emakit snapshot or checkpoint (neither a safetensors file nor a torch.save file)"]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as e:  # torch raises many types for files it cannot read
        return [
            f"{path}: not an emakit snapshot or checkpoint (neither safetensors nor loadable by "
            f"torch.load(weights_only=True)): {_first_line(e)}"
        ]
    return _check_checkpoint(path, state)


def _check_reconstruction(path: Path) -> list[str]:
    _, safe_open = snapshots._safetensors()
    nonfinite = []
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                value = f.get_tensor(key)
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    nonfinite.append(key)
    except Exception as e:  # safetensors raises its own types for damaged files
        return [f"{path}: not a readable safetensors file (truncated or corrupted?): {_first_line(e)}"]
    return [f"{path}: {len(nonfinite)} tensor(s) hold NaN or inf: {_names(nonfinite)}"] if nonfinite else []


# --------------------------------------------------------------------------- checkpoints


def _check_header(path: Path, state: Mapping[str, Any]) -> list[str]:
    """Format, version, time, counters and settings of a checkpoint; [] when they are valid."""
    fmt = state.get("format")
    if fmt not in CHECKPOINT_FORMATS:
        hint = " (a model state dict?)" if "format" not in state else ""
        return [f"{path}: not an emakit checkpoint: format={fmt!r}, expected one of {list(CHECKPOINT_FORMATS)}{hint}"]
    problems = []
    version = state.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= STATE_VERSION:
        problems.append(f"{path}: version={version!r}, expected an int from 1 to {STATE_VERSION}")
    try:
        check_time(str(path), state.get("t"))
    except ValueError as e:
        problems.append(str(e))
    for key in ("num_updates", "num_skipped"):
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            problems.append(f"{path}: {key}={value!r}, expected an int >= 0")
    if not isinstance(state.get("config", {}), Mapping):
        problems.append(f"{path}: config is a {type(state.get('config')).__name__}, expected a mapping")
    return problems


def _check_layout(
    path: Path, state: Mapping[str, Any], profiles: list[dict[str, tuple]], copies: dict[str, tuple]
) -> list[str]:
    """Profiles agree with each other and with the settings; names and shapes only."""
    if not profiles:
        return [f"{path}: no averages (expected one name -> tensor mapping per profile)"]
    problems = []
    if state["format"] == "emakit.EMA" and len(profiles) != 1:
        problems.append(f"{path}: an EMA checkpoint with {len(profiles)} profiles, expected 1")
    gammas = (state.get("config") or {}).get("gammas")
    if state["format"] == "emakit.PowerEMA":
        if not isinstance(gammas, (list, tuple)) or len(gammas) != len(profiles):
            problems.append(f"{path}: config gammas={gammas!r} do not match the {len(profiles)} profiles stored")
    for k, profile in enumerate(profiles[1:], start=1):
        if profile != profiles[0]:
            differ = sorted(set(profile.items()) ^ set(profiles[0].items()))
            problems.append(f"{path}: profile {k} holds other tensors than profile 0 (first: {differ[0][0]!r})")
    overlap = sorted(set(copies) & set(profiles[0]))
    if overlap:
        problems.append(f"{path}: tensors both averaged and copied: {_names(overlap)}")
    return problems


class _TensorChecks:
    """Collects what is wrong with a checkpoint's tensors, one at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.not_floating: list[str] = []
        self.nonfinite: list[str] = []

    def average(self, key: str, value: Tensor) -> None:
        if not value.is_floating_point():
            self.not_floating.append(f"{key} ({str(value.dtype).removeprefix('torch.')})")
        elif not bool(torch.isfinite(value).all()):
            self.nonfinite.append(key)

    def copy(self, key: str, value: Tensor) -> None:
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            self.nonfinite.append(key)

    def problems(self) -> list[str]:
        out = []
        if self.not_floating:
            out.append(f"{self.path}: averages must be floating, got {_names(self.not_floating)}")
        if self.nonfinite:
            out.append(f"{self.path}: {len(self.nonfinite)} tensor(s) hold NaN or inf: {_names(self.nonfinite)}")
        return out


def _check_checkpoint(path: Path, state: Any) -> list[str]:
    """A ``torch.save``'d ``state_dict()`` of an EMA or PowerEMA."""
    if not isinstance(state, Mapping):
        return [f"{path}: not an emakit checkpoint: torch.load gives a {type(state).__name__}, expected a dict"]
    problems = _check_header(path, state)
    if problems and state.get("format") not in CHECKPOINT_FORMATS:
        return problems
    averages, copies = state.get("averages"), state.get("copies", {})
    if not isinstance(averages, (list, tuple)) or not all(isinstance(p, Mapping) for p in averages):
        return [*problems, f"{path}: 'averages' must be a list of name -> tensor mappings (one per profile)"]
    if not isinstance(copies, Mapping):
        return [*problems, f"{path}: 'copies' is a {type(copies).__name__}, expected a mapping of name -> tensor"]
    entries = [(f"averages[{k}][{n!r}]", v) for k, p in enumerate(averages) for n, v in p.items()]
    entries += [(f"copies[{n!r}]", v) for n, v in copies.items()]
    not_tensors = [key for key, v in entries if not isinstance(v, Tensor)]
    if not_tensors:
        return [*problems, f"{path}: entries that are not tensors: {_names(not_tensors)}"]
    profiles = [{n: tuple(v.shape) for n, v in p.items()} for p in averages]
    problems += _check_layout(path, state, profiles, {n: tuple(v.shape) for n, v in copies.items()})
    checks = _TensorChecks(path)
    for key, value in entries:
        (checks.average if key.startswith("averages") else checks.copy)(key, value)
    return problems + checks.problems()


def _check_dcp_checkpoint(path: Path) -> list[str]:
    """An ``EMA.save`` directory: header entries first, then the tensors a batch at a time."""
    errors = _read_errors()
    try:
        metadata = _dcp.read_metadata("verify", path)
        meta = metadata.state_dict_metadata
    except errors as e:
        return [f"{path}: not a readable DCP checkpoint (truncated or corrupted .metadata?): {_first_line(e)}"]
    try:
        _dcp.verify_checksums("verify", path, metadata)
    except _dcp.CheckpointError as e:
        return [str(e).removeprefix("verify: ")]
    small = {k: None for k, v in meta.items() if not hasattr(v, "size")}
    try:
        _dcp.load(small, path, no_dist=True, flatten=False)
    except errors as e:
        return [f"{path}: cannot read the checkpoint's header entries: {_first_line(e)}"]
    state: dict[str, Any] = {k: v for k, v in small.items() if not k.startswith("config.")}
    state["config"] = {k.removeprefix("config."): v for k, v in small.items() if k.startswith("config.")}
    problems = _check_header(path, state)
    if problems and state.get("format") not in CHECKPOINT_FORMATS:
        return problems
    tensors = {k: v for k, v in meta.items() if hasattr(v, "size")}
    profiles: dict[int, dict[str, tuple]] = {}
    copies: dict[str, tuple] = {}
    unexpected = []
    for key, entry in tensors.items():
        group, _, rest = key.partition(".")
        index, _, name = rest.partition(".")
        if group == "averages" and index.isdigit() and name:
            profiles.setdefault(int(index), {})[name] = tuple(entry.size)
        elif group == "copies" and rest:
            copies[rest] = tuple(entry.size)
        else:
            unexpected.append(key)
    if unexpected:
        problems.append(f"{path}: unexpected entries: {_names(unexpected)}")
    if sorted(profiles) != list(range(len(profiles))):
        problems.append(f"{path}: averages of profiles {sorted(profiles)}, expected 0 to {len(profiles) - 1}")
    problems += _check_layout(path, state, [profiles[k] for k in sorted(profiles)], copies)
    checks = _TensorChecks(path)
    try:
        for batch in _batches(tensors):
            _dcp.load(batch, path, no_dist=True, flatten=False)
            for key, value in batch.items():
                (checks.average if key.startswith("averages.") else checks.copy)(key, value)
    except errors as e:
        problems.append(f"{path}: cannot read the tensors (truncated or corrupted?): {_first_line(e)}")
    return problems + checks.problems()


def _batches(tensors: Mapping[str, Any]) -> Iterator[dict[str, Tensor]]:
    """Empty tensors to ``dcp.load`` into, about ``_BATCH_BYTES`` at a time."""
    batch: dict[str, Tensor] = {}
    nbytes = 0
    for key, entry in tensors.items():
        value = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
        batch[key] = value
        nbytes += value.nbytes
        if nbytes >= _BATCH_BYTES:
            yield batch
            batch, nbytes = {}, 0
    if batch:
        yield batch
