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
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ._atomic import write_then_rename

__all__ = ["FORMAT", "VERSION", "SnapshotError", "SnapshotInfo", "read_info", "snapshot_paths", "write_snapshot"]

FORMAT = "emakit.phema"
VERSION = 1
_PATTERN = re.compile(r"^phema-(?P<t>[0-9][0-9.e+\-]*)\.safetensors$")

_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}


class SnapshotError(ValueError):
    """A snapshot file or directory that cannot be used; the message names the file."""


def _safetensors():
    try:
        import safetensors.torch  # noqa: F401
        from safetensors import safe_open
    except ImportError:
        raise ImportError(
            "snapshots need the safetensors package: pip install 'emakit[safetensors]' (or pip install safetensors)"
        ) from None
    return safetensors, safe_open


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise SnapshotError(f"{where}: unknown dtype {name!r}")
    return dtype


def time_label(t: float) -> str:
    """File-name form of a time: zero-padded when whole (so names sort by time), else ``repr``."""
    if float(t).is_integer() and abs(t) < 1e15:
        return f"{int(t):015d}"
    return repr(float(t))


@dataclass(frozen=True)
class SnapshotInfo:
    """What a snapshot file holds, read from its header only."""

    path: Path
    t: float
    num_updates: int
    sigma_rels: tuple[float, ...]
    gammas: tuple[float, ...]
    dtype: torch.dtype  # storage dtype of the averages
    averaged: tuple[str, ...]
    copied: tuple[str, ...]
    static: tuple[str, ...]
    model_dtypes: Mapping[str, torch.dtype]
    shapes: Mapping[str, tuple[int, ...]]
    keys: tuple[str, ...]  # the model's state-dict keys, in order
    aliases: Mapping[str, str]  # key -> stored name, for tied tensors
    nbytes: int

    @property
    def num_profiles(self) -> int:
        return len(self.gammas)


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
) -> Path:
    """Write one snapshot atomically; returns its path. Raises if that file already exists."""
    safetensors, _ = _safetensors()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"phema-{time_label(t)}.safetensors"
    if final.exists():
        raise FileExistsError(f"save_snapshot: {final} already exists (a snapshot at t={t} was saved before)")
    tensors: dict[str, Tensor] = {}

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
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "t": repr(t),
        "num_updates": str(num_updates),
        "sigma_rels": json.dumps([float(s) for s in sigma_rels]),
        "gammas": json.dumps([float(g) for g in gammas]),
        "dtype": dtype_name(dtype),
        "averaged": json.dumps(list(averages[0]) if averages else []),
        "copied": json.dumps(list(copies)),
        "static": json.dumps(list(static)),
        "model_dtypes": json.dumps({n: dtype_name(d) for n, d in model_dtypes.items()}),
        "keys": json.dumps(keys),
        "aliases": json.dumps(aliases),
    }
    write_then_rename([(final, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=metadata))])
    return final


def snapshot_paths(directory: str | os.PathLike) -> list[Path]:
    """The snapshot files of a directory (``phema-*.safetensors``), by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SnapshotError(f"{directory}: not a directory")
    return sorted(p for p in directory.iterdir() if _PATTERN.match(p.name) and p.is_file())


def read_info(path: str | os.PathLike) -> SnapshotInfo:
    """Read and check a snapshot's header; :class:`SnapshotError` naming the file if it is not valid."""
    _, safe_open = _safetensors()
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    except Exception as e:  # safetensors raises its own types for truncated / malformed files
        raise SnapshotError(f"{path}: not a readable safetensors file (truncated or corrupted?): {e}") from None
    if meta.get("format") != FORMAT:
        raise SnapshotError(f"{path}: not an emakit power-EMA snapshot (format={meta.get('format')!r})")
    try:
        version = int(meta["version"])
        if version > VERSION:
            raise SnapshotError(
                f"{path}: snapshot format version {version} is newer than this emakit reads ({VERSION})"
            )
        t = float(meta["t"])
        sigma_rels = tuple(float(s) for s in json.loads(meta["sigma_rels"]))
        gammas = tuple(float(g) for g in json.loads(meta["gammas"]))
        averaged = tuple(json.loads(meta["averaged"]))
        copied = tuple(json.loads(meta["copied"]))
        static = tuple(json.loads(meta["static"]))
        model_dtypes = {n: parse_dtype(d, str(path)) for n, d in json.loads(meta["model_dtypes"]).items()}
        dtype = parse_dtype(meta["dtype"], str(path))
        num_updates = int(meta["num_updates"])
        state_keys = tuple(json.loads(meta["keys"]))
        aliases = dict(json.loads(meta["aliases"]))
    except SnapshotError:
        raise
    except (KeyError, ValueError, TypeError) as e:
        raise SnapshotError(f"{path}: snapshot metadata is incomplete or malformed ({type(e).__name__}: {e})") from None
    if not (math.isfinite(t) and t >= 0) or len(sigma_rels) != len(gammas) or not gammas:
        raise SnapshotError(f"{path}: snapshot metadata is inconsistent (t={t}, {len(gammas)} profiles)")
    expected = {f"avg.{j}/{n}" for j in range(len(gammas)) for n in averaged}
    expected |= {f"copy/{n}" for n in copied} | {f"static/{n}" for n in static}
    if expected != set(keys):
        missing = sorted(expected - set(keys))
        extra = sorted(set(keys) - expected)
        raise SnapshotError(
            f"{path}: tensors do not match the metadata (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    named_shapes = {n: shapes[f"avg.0/{n}"] for n in averaged}
    named_shapes.update({n: shapes[f"copy/{n}"] for n in copied})
    named_shapes.update({n: shapes[f"static/{n}"] for n in static})
    return SnapshotInfo(
        path=path,
        t=t,
        num_updates=num_updates,
        sigma_rels=sigma_rels,
        gammas=gammas,
        dtype=dtype,
        averaged=averaged,
        copied=copied,
        static=static,
        model_dtypes=model_dtypes,
        shapes=named_shapes,
        keys=state_keys,
        aliases=aliases,
        nbytes=path.stat().st_size,
    )
