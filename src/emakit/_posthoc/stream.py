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

from ..snapshots import SnapshotError, SnapshotInfo


def _weighted_sums(
    solutions: Sequence, reader_for, bar, accumulate: torch.dtype = torch.float32
) -> list[dict[str, Tensor]]:
    """``sum_i x_i * snapshot_i`` for every solution, reading each snapshot file once, tensor by tensor."""
    used = solutions[0].snapshots
    # Accumulate in fp32 at least (snapshots may be fp16/bf16), cast at the end.
    if not (isinstance(accumulate, torch.dtype) and accumulate.is_floating_point):
        raise ValueError(f"reconstruct: accumulate must be a floating torch.dtype, got accumulate={accumulate!r}")
    acc_dtype = torch.promote_types(torch.promote_types(torch.float32, accumulate), used[-1].dtype)
    sums: list[dict[str, Tensor]] = [{} for _ in solutions]
    names = used[-1].averaged
    for i, info in enumerate(used):
        items = [(j, name) for j in range(info.num_profiles) for name in names]
        order = [_average_key(info, j, name) for j, name in items]
        reader = reader_for(info, list(dict.fromkeys(order)))
        try:
            values: dict[str, Tensor] = {}
            for (j, name), key in zip(items, order):
                x = values[key] if key in values else reader.get(key).to(acc_dtype)
                # A sum is NaN/Inf when an element is (30x faster than isfinite); an overflowing sum is confirmed.
                if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
                    raise SnapshotError(f"{info.path}: tensor {key!r} holds NaN or Inf; it cannot be averaged")
                if key.startswith("static/"):
                    values[key] = x  # a parameter frozen at that time: its value is every profile's average
                for sol, acc in zip(solutions, sums):
                    w = sol.weights[i][j]
                    if name in acc:
                        acc[name].add_(x, alpha=w)
                    else:
                        acc[name] = x * w
                bar.update(1)
        except SnapshotError:
            raise
        except Exception as e:
            raise SnapshotError(f"{info.path}: could not read the snapshot data (truncated or corrupted?): {e}") from e
        finally:
            reader.close()
    return sums


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


def _read_extras(latest: SnapshotInfo, reader_for) -> dict[str, Tensor]:
    """The copied and stored static tensors of the latest snapshot used, by name."""
    extras: dict[str, Tensor] = {}
    order = [f"copy/{n}" for n in latest.copied] + [f"static/{n}" for n in latest.static]
    reader = reader_for(latest, order)
    try:
        for key in order:
            extras[key.split("/", 1)[1]] = reader.get(key)
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
