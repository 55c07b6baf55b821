"""The streaming weighted sum under post-hoc reconstruction: ``sum_i x_i * snapshot_i``.

Owns reading the snapshot files for :func:`emakit.posthoc.reconstruct`, each once and one
tensor at a time, accumulating every requested length's weighted sum (in fp32 at least),
reading the copied and static tensors of the latest snapshot, the output dtype, and the
progress bar (tqdm, when installed). Gets its weights from the solve and its readers from
``reconstruct``: it neither solves nor chooses how a file is opened.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._files import read_ahead as _read_ahead
from ..snapshots import SnapshotError, SnapshotInfo


def _weighted_sums(
    solutions: Sequence, reader_for, bar, accumulate: torch.dtype = torch.float32
) -> list[dict[str, Tensor]]:
    """``sum_i x_i * snapshot_i`` for every solution, reading each snapshot file once, tensor by tensor.

    Plain single files (``reader_for.whole_files``) are read in file order, the next tensors
    read and checksummed on threads meanwhile (:mod:`emakit._files.read_ahead`); other
    snapshots through ``reader_for``. NaN or Inf in a snapshot makes the sums non-finite:
    checked once at the end, and only then are the files searched for the tensor to name.
    """
    used = solutions[0].snapshots
    # Accumulate in fp32 at least (snapshots may be fp16/bf16), cast at the end.
    if not (isinstance(accumulate, torch.dtype) and accumulate.is_floating_point):
        raise ValueError(f"reconstruct: accumulate must be a floating torch.dtype, got accumulate={accumulate!r}")
    acc_dtype = torch.promote_types(torch.promote_types(torch.float32, accumulate), used[-1].dtype)
    sums: list[dict[str, Tensor]] = [{} for _ in solutions]
    names = used[-1].averaged
    # (snapshot index, key) -> the (profile, name) it is the average of; a static tensor (frozen at that
    # time) is every profile's average, read once.
    plan: dict[tuple[int, str], list[tuple[int, str]]] = {}
    for i, info in enumerate(used):
        for j in range(info.num_profiles):
            for name in names:
                plan.setdefault((i, _average_key(info, j, name)), []).append((j, name))
    for i, key, value in _values(used, plan, reader_for):
        x = value.to(acc_dtype)
        for j, name in plan[(i, key)]:
            for sol, acc in zip(solutions, sums):
                w = sol.weights[i][j]
                if name in acc:
                    acc[name].add_(x, alpha=w)
                else:
                    acc[name] = x * w
            bar.update(1)
    # A sum is NaN/Inf when an element is (30x faster than isfinite); an overflowing sum is confirmed.
    if any(not bool(torch.isfinite(v.sum())) and not bool(torch.isfinite(v).all()) for v in sums[0].values()):
        _name_nonfinite(used, names, reader_for)
    return sums


def _values(used: Sequence[SnapshotInfo], plan: dict, reader_for):
    """``(snapshot index, key, tensor)`` of every key of ``plan``, file by file (each valid until the next)."""
    if getattr(reader_for, "whole_files", False) and all(_read_ahead.supports(info) for info in used):
        index = {id(info): i for i, info in enumerate(used)}
        for info, key, value in _read_ahead.read_ahead(((used[i], k) for i, k in plan), recycle=True, reorder=True):
            yield index[id(info)], key, value
        return
    by_file: dict[int, list[str]] = {}
    for i, key in plan:
        by_file.setdefault(i, []).append(key)
    for i, keys in by_file.items():
        for key, value in _tensors(used[i], reader_for, keys):
            yield i, key, value


def _tensors(info: SnapshotInfo, reader_for, keys: list[str]):
    """``(key, tensor)`` of ``keys`` of one snapshot, in order; read errors name the file."""
    reader = reader_for(info, keys)
    try:
        for key in keys:
            yield key, reader.get(key)
    except SnapshotError:
        raise
    except Exception as e:
        raise SnapshotError(f"{info.path}: could not read the snapshot data (truncated or corrupted?): {e}") from e
    finally:
        reader.close()


def _name_nonfinite(used: Sequence[SnapshotInfo], names: Sequence[str], reader_for) -> None:
    """Raise naming the first snapshot tensor that holds NaN or Inf (none: the sum overflowed, left as it is)."""
    for info in used:
        keys = list(dict.fromkeys(_average_key(info, j, n) for j in range(info.num_profiles) for n in names))
        for key, value in _tensors(info, reader_for, keys):
            if not bool(torch.isfinite(value).all()):
                raise SnapshotError(f"{info.path}: tensor {key!r} holds NaN or Inf; it cannot be averaged")


def _average_key(info: SnapshotInfo, j: int, name: str) -> str:
    """Where snapshot ``info`` holds profile ``j``'s average of ``name``."""
    if name in info.averaged:
        return f"avg.{j}/{name}"
    if name in info.static:
        return f"static/{name}"
    raise SnapshotError(
        f"{info.path}: holds no average of {name!r}, which later snapshots average (it was frozen at "
        f"t={info.t:g} and saved with static=False); reconstruct at a t whose snapshots all average it, or "
        f"save snapshots with static=True"
    )


def _check_finite(info: SnapshotInfo, key: str, x: Tensor, why: str) -> None:
    """Raise if ``x`` holds NaN or Inf: a sum is NaN/Inf when an element is (30x faster than ``isfinite``), and
    a sum that overflowed while every element is finite is confirmed element by element."""
    if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        raise SnapshotError(f"{info.path}: tensor {key!r} holds NaN or Inf; {why}")


def _read_extras(latest: SnapshotInfo, reader_for) -> dict[str, Tensor]:
    """The copied and stored static tensors of the latest snapshot used, by name."""
    extras: dict[str, Tensor] = {}
    order = [f"copy/{n}" for n in latest.copied] + [f"static/{n}" for n in latest.static]
    reader = reader_for(latest, order)
    try:
        for key in order:
            extras[key.split("/", 1)[1]] = value = reader.get(key)
            if value.is_floating_point():  # copied and frozen tensors are checked like averages
                _check_finite(latest, key, value, "it would be returned as it is")
    except SnapshotError:
        raise
    except Exception as e:
        raise SnapshotError(f"{latest.path}: could not read the snapshot data (truncated or corrupted?): {e}") from e
    finally:
        reader.close()
    return extras


def _out_dtype(dtype: torch.dtype | str) -> torch.dtype | None:
    if dtype == "model":
        return None
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise ValueError(f"dtype must be 'model' or a floating dtype name such as 'float32', got {dtype!r}")
        return resolved
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise ValueError(f"dtype must be 'model' or a floating torch.dtype, got {dtype!r}")


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="reconstruct", unit="tensor", leave=False)
