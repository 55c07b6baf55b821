"""The snapshot header: file names, metadata fields, their validation, and per-tensor checksums.

Owns what a snapshot *says* about itself, whatever file holds it (single-file safetensors or
a sharded ``.shards`` or DCP directory): the format name and version, the time in the file name, each
profile's ``sigma_rel`` and ``gamma``, the tensor names and dtypes, the checksum of every
tensor (CRC-32, or CRC-32C where the header names it as ``checksum_algorithm``), and the checks
that reject a damaged or edited header with a :class:`SnapshotError` naming the file. Reads and writes no file (:mod:`emakit.snapshots`
does).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from . import checksums as _checksums

FORMAT = "emakit.phema"
VERSION = 2  # the newest format version this emakit reads
# A file is written with the oldest version that describes it, so that older readers keep reading what they can:
# 1 for every snapshot but one with predicted compact deltas, 2 for that (a reader of 1 would ignore the prediction
# and decode wrong values; it refuses version 2 by name instead).
WRITTEN_VERSION = 1
PREDICTED_VERSION = 2
_PATTERN = re.compile(r"^phema-(?P<t>[0-9][0-9.e+\-]*)\.safetensors$")
_DCP_PATTERN = re.compile(r"^phema-(?P<t>[0-9][0-9.e+\-]*)\.dcp$")
_SHARDS_PATTERN = re.compile(r"^phema-(?P<t>[0-9][0-9.e+\-]*)\.shards$")
_DCP_INFO = "emakit.json"

_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}


class SnapshotError(ValueError):
    """A snapshot file or directory that cannot be used; the message names the file."""


def checksum(tensor: Tensor, algorithm: str = _checksums.LEGACY) -> str:
    """The checksum of a tensor's bytes as 8 hex digits (what snapshot headers store per tensor).

    ``algorithm``: ``"crc32"`` (files that name none) or ``"crc32c"`` (see :mod:`emakit._files.checksums`).
    """
    return _checksums.hex_digest(tensor, algorithm)


#: safetensors' names of the dtypes snapshots hold.
#: safetensors' dtype names, every one torch reads (the averages are one of the four floats; copied and static tensors
#: may be any).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2": torch.float8_e5m2,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}  # fmt: skip


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
    sharded: bool = False  # a directory written by several ranks (``.shards``, or DCP's ``.dcp``)
    flat: tuple[str, ...] = ()  # names stored flattened (DeepSpeed ZeRO-3), reshaped on reading
    checksums: Mapping[str, str] | None = None  # key -> checksum (hex) of its bytes; None in older files
    checksum_algorithm: str = _checksums.LEGACY  # of ``checksums``: "crc32" (files that name none) or "crc32c"
    encoding: str = "fp32"  # "fp32": plain tensors (also fp16/bf16 ones); "compact": see emakit._files.compact
    reference: float | None = None  # compact delta snapshot: the t of the snapshot it is relative to
    scales: Mapping[str, float] | None = None  # compact delta snapshot: avg key -> its delta's scale
    # compact delta snapshot: avg key -> the coefficients of its prediction (emakit._files.compact); absent: none
    predictors: Mapping[str, tuple[float, ...]] | None = None
    previous: float | None = None  # compact delta snapshot that predicts from it: the t of its reference's reference
    # single file: key -> (dtype, shape, file offset, bytes), as the header that read_info parsed places them (readers
    # reuse it while the file keeps the size it had then); None where not known
    stored: Mapping[str, tuple] | None = field(default=None, repr=False, compare=False)

    @property
    def pickled(self) -> bool:
        """Whether reading it unpickles (a DCP ``.dcp`` snapshot): read those only from a trusted source."""
        return self.sharded and self.path.suffix == ".dcp"

    @property
    def num_profiles(self) -> int:
        """How many profiles (tracked ``sigma_rel`` values) the snapshot holds."""
        return len(self.gammas)


def _metadata(
    *,
    t: float,
    num_updates: int,
    sigma_rels: list[float],
    gammas: list[float],
    averaged: list[str],
    copied: list[str],
    static: list[str],
    model_dtypes: dict[str, torch.dtype],
    dtype: torch.dtype,
    keys: list[str],
    aliases: dict[str, str],
) -> dict[str, str]:
    return {
        "format": FORMAT,
        "version": str(WRITTEN_VERSION),
        "t": repr(t),
        "num_updates": str(num_updates),
        "sigma_rels": json.dumps([float(s) for s in sigma_rels]),
        "gammas": json.dumps([float(g) for g in gammas]),
        "dtype": dtype_name(dtype),
        "averaged": json.dumps(averaged),
        "copied": json.dumps(copied),
        "static": json.dumps(static),
        "model_dtypes": json.dumps({n: dtype_name(d) for n, d in model_dtypes.items()}),
        "keys": json.dumps(keys),
        "aliases": json.dumps(aliases),
    }


def file_name(t: float, suffix: str = ".safetensors") -> str:
    """Name of the snapshot at time ``t``."""
    return f"phema-{time_label(t)}{suffix}"


#: Encodings of single-file snapshots (the ``encoding`` header field; absent means ``"fp32"``).
ENCODINGS = ("fp32", "compact")


def _compact_fields(path: Path, meta: Mapping[str, str], t: float) -> tuple[dict, dict]:
    """A compact snapshot's model shapes of its averages, and its delta fields (reference time, scales, predictors,
    previous) for :class:`SnapshotInfo`."""
    try:
        shapes = {k: tuple(int(n) for n in v) for k, v in json.loads(meta["shapes"]).items()}
        reference = float(meta["reference"]) if "reference" in meta else None
        scales = {k: float(v) for k, v in json.loads(meta["scales"]).items()} if reference is not None else None
        predictors = {k: tuple(float(a) for a in v) for k, v in json.loads(meta.get("predictors", "{}")).items()}
        previous = float(meta["previous"]) if "previous" in meta else None
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError) as e:
        raise SnapshotError(
            f"{path}: compact snapshot header is incomplete or malformed ({type(e).__name__}: {e})"
        ) from None
    if reference is not None and not (math.isfinite(reference) and 0 <= reference < t):
        raise SnapshotError(f"{path}: compact snapshot at t={t:g} is relative to t={reference:g}; expected t < {t:g}")
    if scales is not None and (
        set(scales) != set(shapes) or not all(math.isfinite(v) and v >= 0 for v in scales.values())
    ):
        raise SnapshotError(f"{path}: compact snapshot scales do not cover its averages or are not finite (corrupted?)")
    _check_predictors(path, predictors, scales, reference, previous)
    delta = {"reference": reference, "scales": scales, "predictors": predictors or None, "previous": previous}
    return shapes, delta


def reads_previous(key: str, coefficients) -> bool:
    """Whether the predicted delta of ``key`` (``avg.<j>/<name>``) also predicts from its own increment the time
    before, read from the ``previous`` snapshot: ``j + 1`` coefficients (the ``j`` lower profiles' increments,
    then its own) rather than ``j``."""
    return len(coefficients) == int(key.split("/", 1)[0][4:]) + 1


def _check_predictors(path: Path, predictors: dict, scales: dict | None, reference, previous) -> None:
    """Profile ``j``'s prediction has ``j`` coefficients (the lower profiles' increments), or ``j + 1`` (and its
    own increment before, from the ``previous`` snapshot): finite, of delta keys only."""
    for key, coefficients in predictors.items():
        match = re.fullmatch(r"avg\.(\d+)/.+", key, re.DOTALL)
        j = int(match.group(1)) if match else -1
        if scales is None or key not in scales or len(coefficients) not in (j, j + 1) or not coefficients \
                or not all(math.isfinite(a) for a in coefficients):  # fmt: skip
            raise SnapshotError(f"{path}: compact snapshot predictor of {key!r} is malformed (corrupted header?)")
    own = any(reads_previous(k, c) for k, c in predictors.items())
    if own != (previous is not None) or (previous is not None and not (math.isfinite(previous) and previous < reference)):
        raise SnapshotError(
            f"{path}: compact snapshot predicts from an earlier increment but names no earlier snapshot (previous="
            f"{previous}, reference={reference}; corrupted header?)"
        )


def _parse_info(
    path: Path, meta: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]], nbytes: int
) -> SnapshotInfo:
    keys = list(shapes)
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
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError) as e:
        raise SnapshotError(f"{path}: snapshot metadata is incomplete or malformed ({type(e).__name__}: {e})") from None
    if not (math.isfinite(t) and t >= 0) or len(sigma_rels) != len(gammas) or not gammas:
        raise SnapshotError(f"{path}: snapshot metadata is inconsistent (t={t}, {len(gammas)} profiles)")
    _check_header_values(path, t, sigma_rels, gammas, dtype, num_updates)
    _check_header_names(path, averaged, copied, static, model_dtypes, state_keys, aliases)
    checksums = _check_header_tensors(path, meta, keys, len(gammas), averaged, copied, static)
    algorithm = checksum_algorithm(path, meta)
    encoding, delta, shapes = _encoding_fields(path, meta, t, keys, shapes)
    if delta.get("predictors") and version < PREDICTED_VERSION:
        raise SnapshotError(f"{path}: version {version} snapshot with predicted deltas (corrupted header?)")
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
        nbytes=nbytes,
        checksums=checksums,
        checksum_algorithm=algorithm,
        encoding=encoding,
        **delta,
    )


def _check_header_tensors(
    path: Path, meta: Mapping[str, str], keys: list[str], profiles: int, averaged: tuple, copied: tuple, static: tuple
) -> dict | None:
    """The header's checksums (None without), once they and the metadata's names cover exactly the stored tensors."""
    checksums = None
    if "checksums" in meta:
        try:
            checksums = dict(json.loads(meta["checksums"]))
        except (ValueError, TypeError, RecursionError) as e:
            raise SnapshotError(f"{path}: snapshot checksums are malformed ({e})") from None
        if set(checksums) != set(keys):
            raise SnapshotError(f"{path}: snapshot checksums do not cover its tensors (corrupted header?)")
    expected = {f"avg.{j}/{n}" for j in range(profiles) for n in averaged}
    expected |= {f"copy/{n}" for n in copied} | {f"static/{n}" for n in static}
    if expected != set(keys):
        missing = sorted(expected - set(keys))
        extra = sorted(set(keys) - expected)
        raise SnapshotError(
            f"{path}: tensors do not match the metadata (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    return checksums


def checksum_algorithm(path: Path, meta: Mapping[str, str]) -> str:
    """The ``checksum_algorithm`` a header or index names (``"crc32"`` where it names none, as older files)."""
    try:
        return _checksums.check_algorithm(meta.get("checksum_algorithm", _checksums.LEGACY), str(path))
    except ValueError as e:
        raise SnapshotError(f"{e} (written by a newer emakit, or a damaged header)") from None


def _encoding_fields(
    path: Path, meta: Mapping[str, str], t: float, keys: list[str], shapes: Mapping[str, tuple[int, ...]]
) -> tuple[str, dict, Mapping[str, tuple[int, ...]]]:
    """``(encoding, delta fields, shapes)``: a compact snapshot's shapes are its averages' model shapes."""
    encoding = meta.get("encoding", "fp32")
    if encoding not in ENCODINGS:
        raise SnapshotError(f"{path}: unknown snapshot encoding {encoding!r}; expected one of {ENCODINGS}")
    delta: dict = {}
    if encoding == "compact":
        model_shapes, delta = _compact_fields(path, meta, t)
        if set(model_shapes) != {k for k in keys if k.startswith("avg.")}:
            raise SnapshotError(f"{path}: compact snapshot shapes do not cover its averages (corrupted header?)")
        shapes = {**shapes, **model_shapes}
    return encoding, delta, shapes


def _check_header_names(
    path: Path, averaged: tuple, copied: tuple, static: tuple, model_dtypes: dict, state_keys: tuple, aliases: dict
) -> None:
    """The header's name lists agree with each other (a damaged header fails here, not later)."""
    lists = (averaged, copied, static, state_keys)
    stored = [*averaged, *copied, *static]
    keys = set(state_keys)
    if (
        any(not all(isinstance(n, str) for n in names) or len(set(names)) != len(names) for names in lists)
        or len(set(stored)) != len(stored)
        or set(model_dtypes) != set(averaged)
        or any(n not in keys for n in stored)
        or any(k not in keys for k in aliases)
        or any(not isinstance(v, str) for v in aliases.values())
    ):
        raise SnapshotError(f"{path}: the header's tensor names do not agree with each other (corrupted header?)")


def _check_header_values(
    path: Path, t: float, sigma_rels: tuple, gammas: tuple, dtype: torch.dtype, num_updates: int
) -> None:
    """The header's numbers are what a snapshot can hold: ``t`` as in the file name, gammas of the sigma_rels."""
    pattern = {".safetensors": _PATTERN, ".dcp": _DCP_PATTERN, ".shards": _SHARDS_PATTERN}.get(path.suffix)
    match = pattern.match(path.name) if pattern is not None else None
    if match is not None and float(match["t"]) != t:
        raise SnapshotError(f"{path}: the header says t={t:g}, the file name t={float(match['t']):g}")
    from ..schedules import SIGMA_REL_MAX, sigma_rel_to_gamma

    for s, g in zip(sigma_rels, gammas):
        if not (math.isfinite(s) and 0 < s < SIGMA_REL_MAX and math.isfinite(g)):
            raise SnapshotError(f"{path}: the header holds sigma_rel={s}, gamma={g}: not a power profile")
        if not math.isclose(sigma_rel_to_gamma(s), g, rel_tol=1e-6):
            raise SnapshotError(
                f"{path}: the header's gamma={g} does not belong to its sigma_rel={s} "
                f"(expected {sigma_rel_to_gamma(s):.6g})"
            )
    if not dtype.is_floating_point:
        raise SnapshotError(f"{path}: the header says the averages are {dtype}, not a floating dtype")
    if num_updates < 0:
        raise SnapshotError(f"{path}: the header says num_updates={num_updates}")
