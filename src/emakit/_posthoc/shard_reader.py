"""Reading snapshot tensors shard by shard, for a reconstruction that runs distributed.

Owns ``posthoc.reconstruct(..., like=sharded_state_dict)``'s reader: each rank reads only
the parts of each snapshot tensor that its DTensors in ``like`` hold (from a ``.shards``
snapshot just the files holding that box; collective for DCP snapshots), and the results
are wrapped back into DTensors of the same layout.
Sits above :mod:`emakit.snapshots` and :mod:`emakit.distributed`; neither imports it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import distributed
from .._engine.model import normalize_name
from .._files import dcp as _dcp
from ..snapshots import dcp_tensor_table, open_tensors, parse_dtype, shard_parts


def _layout_of(value: Tensor) -> distributed.Layout | None:
    if not distributed.is_dtensor(value):
        return None
    return distributed.Layout(
        value.device_mesh, tuple(value.placements), value.shape, tuple(value.stride()), value.shape
    )


class ShardReader:
    """Reads this rank's parts of snapshot tensors in the layout of a sharded state dict ``like``.

    Collective for DCP snapshots: every rank asks for the same keys in the same order, and
    each reads only its shards. From a ``.shards`` snapshot each rank reads the parts that
    overlap its box, no communication. From a single-file snapshot each rank reads the
    tensor and keeps its part.
    """

    def __init__(self, like: dict[str, Tensor], info, order: list[str]) -> None:
        self._like = like
        self._info = info
        self._single = None
        self._table = None
        self._parts = None
        if not info.sharded:
            self._single = open_tensors(info, order)
        elif not info.pickled:
            self._parts = shard_parts(info)

    def get(self, key: str) -> Tensor:
        name = key.split("/", 1)[1]
        target = self._like.get(name)
        if target is None:
            raise KeyError(f"reconstruct: like= has no tensor {name!r}, which the snapshots hold")
        layout = _layout_of(target)
        if self._single is not None:
            full = self._single.get(key)
            return full if layout is None else layout.local_of(full)
        if self._parts is not None:
            return self._box(key, name, target, layout)
        if self._table is None:
            self._table = dcp_tensor_table(self._info.path)
        dtype_name, stored_shape, _ = self._table[key]
        dtype = parse_dtype(dtype_name, str(self._info.path))
        if layout is None:
            dest: Tensor = torch.empty(stored_shape, dtype=dtype, device=target.device)
        else:
            if list(target.shape) != list(stored_shape):
                raise ValueError(
                    f"reconstruct: like[{name!r}] has shape {tuple(target.shape)}, the snapshot stores "
                    f"{tuple(stored_shape)}"
                )
            local = torch.empty(target.to_local().shape, dtype=dtype, device=target.to_local().device)
            dest = layout.wrap(local)
        _dcp.load({key: dest}, self._info.path, flatten=False, where="reconstruct")
        return dest if layout is None else dest.to_local()

    def _box(self, key: str, name: str, target: Tensor, layout: distributed.Layout | None) -> Tensor:
        """This rank's box of ``key`` from a ``.shards`` snapshot (all of it for a plain ``like`` tensor)."""
        _, stored_shape, model_shape = self._parts.tensors[key]
        if layout is None:
            full = self._parts.read(key)
            return full.view(model_shape).to(target.device)
        if tuple(target.shape) != stored_shape:
            raise ValueError(
                f"reconstruct: like[{name!r}] has shape {tuple(target.shape)}, the snapshot stores {stored_shape}"
            )
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
        return self._parts.read(key, offset, shape).to(target.to_local().device)

    def close(self) -> None:
        if self._single is not None:
            self._single.close()
        if self._parts is not None:
            self._parts.close()

    @classmethod
    def factory(cls, like, latest) -> Callable:
        if not isinstance(like, dict):
            raise TypeError(f"reconstruct: like must be a state dict (name -> tensor), got {type(like).__name__}")
        named = {normalize_name(k): v for k, v in like.items()}
        missing = [n for n in (*latest.averaged, *latest.copied, *latest.static) if n not in named]
        if missing:
            raise KeyError(f"reconstruct: like= has no tensor {missing[0]!r} ({len(missing)} names missing)")
        return lambda info, order: cls(named, info, order)


def wrap_like(like: dict[str, Tensor], values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Local parts as DTensors with the layout of the matching ``like`` entries."""
    named = {normalize_name(k): v for k, v in like.items()}
    out = {}
    for key, value in values.items():
        layout = _layout_of(named[key]) if key in named else None
        out[key] = value if layout is None else layout.wrap(value)
    return out
