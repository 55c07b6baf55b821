"""Binding a model to the averages: where to read each tensor, checked once, re-checked cheaply.

Owns the match between a model (the one given at construction, or any other view of it:
DDP, ``torch.compile``) and the storage, by normalised name: every tensor must be present
with the shape, dtype, device and sharding it had when the average was built. A
:class:`Binding` caches where each source lives and its local part; :meth:`Binder.fresh`
re-checks it with data pointers only, and rebuilds (so re-validates) it when the model's
tensors were re-allocated, moved or cast.

It reads the model and never writes to it, nor to the averages (the update is
:mod:`emakit._engine.update`, swaps are :mod:`emakit._engine.swap`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from torch import Tensor, nn

from .. import distributed, kernels
from .model import Slot, model_slots
from .storage import Group, Storage


@dataclass
class Binding:
    """A model bound to the averages: where to read each tensor, checked once."""

    sources: list[list[tuple[dict, str]]]  # per group: (table, attr) per tensor
    locals: list[list[Tensor]]  # per group: the part of each tensor this rank averages
    big: list[list[Tensor]]  # per group: local parts of the large tensors
    small_flat: list[list[Tensor]]  # per group: 1-D views of the small ones
    ptrs: list[list[int]]  # per group: data pointers of all sources when bound (a change: re-allocated)
    copies: list[tuple[dict, str]]
    regions: list[Tensor | None]  # per group: one flat view over all its sources, if laid out so
    region_ptrs: list[tuple[int, int] | None]


class Binder:
    """Makes, caches and re-checks the bindings of models to one storage."""

    def __init__(self, owner: str, storage: Storage, names: dict[str, Slot], rows_mesh) -> None:
        self._owner = owner
        self._storage = storage
        self._names = names  # every tensor of the model the average was built on
        self._rows_mesh = rows_mesh
        self._cache: weakref.WeakKeyDictionary[nn.Module, Binding] = weakref.WeakKeyDictionary()

    def bind(self, model: nn.Module) -> Binding:
        """The cached binding of ``model``, made (and checked) on first use."""
        binding = self._cache.get(model)
        if binding is None:
            binding = self._cache[model] = self.make(model)
        return binding

    def fresh(self, model: nn.Module) -> Binding:
        """The binding, re-checked cheaply; rebuilt (and so re-validated) when the model's tensors
        were re-allocated, moved or cast since it was made. Nothing has changed when this raises."""
        binding = self.bind(model)
        if not self._still_valid(binding):
            del self._cache[model]
            binding = self.bind(model)  # raises the precise error if the model no longer fits
        return binding

    def make(self, model: nn.Module) -> Binding:
        """Match ``model``'s tensors to ours by normalised name; raise naming the first mismatch."""
        owner = self._owner
        if not isinstance(model, nn.Module):
            raise TypeError(f"{owner}: model must be a torch.nn.Module, got {type(model).__name__}")
        distributed.check_model(owner, model)
        distributed.reshard(model)
        slots, _ = model_slots(model)
        missing = [n for n in self._names if n not in slots]
        if missing:
            raise ValueError(
                f"{owner}: the model has no tensor named {missing[0]!r} "
                f"({len(missing)} of {len(self._names)} names missing)"
            )
        unexpected = [n for n in slots if n not in self._names]
        if unexpected:
            raise ValueError(
                f"{owner}: the model has a tensor {unexpected[0]!r} that this average "
                f"does not track ({len(unexpected)} unexpected names)"
            )
        sources, locals_ = [], []
        for group in self._storage.groups:
            sources.append([(slots[name].table, slots[name].attr) for name in group.names])
            locals_.append([self._check_slot(slots[name], group, i) for i, name in enumerate(group.names)])
        copies = [self._check_copy(slots[name], stored) for name, stored in self._storage.copies.items()]
        big, small_flat, all_ptrs, regions, region_ptrs = [], [], [], [], []
        for group, row, parts in zip(self._storage.groups, sources, locals_):
            big.append([parts[i] for i in group.big])
            small_flat.append([kernels.flat_view(parts[i]) for i in group.small])
            pointer = distributed.POINTER[group.kind]
            all_ptrs.append([pointer(tbl[a]) for tbl, a in row])
            region = _flat_region(parts, group) if group.kind == "local" else None
            regions.append(region)
            region_ptrs.append(None if region is None else _end_ptrs(row))
            if region is not None:
                self._storage.use_region(group)
        return Binding(sources, locals_, big, small_flat, all_ptrs, copies, regions, region_ptrs)

    def _check_copy(self, slot: Slot, stored: Tensor) -> tuple[dict, str]:
        t = slot.get()
        if type(t.detach()) is not Tensor or t.shape != stored.shape or t.dtype != stored.dtype:
            raise ValueError(
                f"{self._owner}: buffer {slot.name!r} is a {type(t).__name__} of shape {tuple(t.shape)} and dtype "
                f"{t.dtype} in the model, expected a tensor of shape {tuple(stored.shape)} and dtype {stored.dtype}"
            )
        return slot.table, slot.attr

    def _check_slot(self, slot: Slot, group: Group, i: int) -> Tensor:
        """Check the model's tensor against what was averaged; return the part this rank averages."""
        owner = self._owner
        t = slot.get()
        layout = group.layouts[i]
        kind, _, local = distributed.classify(t, self._rows_mesh)
        if kind != group.kind:
            raise ValueError(
                f"{owner}: tensor {slot.name!r} is held as {kind!r} in the model, but the average was "
                f"built on a {group.kind!r} one (see emakit.distributed); build the average on the model as "
                f"it is trained"
            )
        shape = layout.model_shape if layout is not None else group.shapes[i]
        model_shape = distributed.model_shape(t, kind)
        if model_shape != shape:
            raise ValueError(
                f"{owner}: tensor {slot.name!r} has shape {tuple(model_shape)} in the model, expected {tuple(shape)}"
            )
        if t.dtype != group.source_dtype:
            raise ValueError(
                f"{owner}: tensor {slot.name!r} has dtype {t.dtype} in the model, expected "
                f"{group.source_dtype} (the dtype it had when the average was created); if the model was cast "
                f"on purpose, call .to() on the {owner} to read the cast weights (its averages keep {group.dtype})"
            )
        if local.shape != group.shapes[i]:
            raise ValueError(
                f"{owner}: this rank holds a part of shape {tuple(local.shape)} of tensor {slot.name!r}, "
                f"expected {tuple(group.shapes[i])}: the model is sharded differently than when the average "
                f"was created (load a checkpoint into a new average to change the sharding)"
            )
        if local.device != group.source_device:
            raise ValueError(
                f"{owner}: tensor {slot.name!r} is on {local.device} in the model, expected {group.source_device}: "
                f"the model was moved after this {owner} was built (model.to(...), accelerator.prepare(model)). "
                f"Call .to({str(local.device)!r}) on the {owner} to move its averages along, or .to() to keep "
                f"them on {group.device} and read the moved weights; or build the {owner} after moving the model"
            )
        return local

    def _still_valid(self, binding: Binding) -> bool:
        for g, (group, row) in enumerate(zip(self._storage.groups, binding.sources)):
            t = row[0][0][row[0][1]]
            if t.dtype != group.source_dtype:
                return False
            if binding.regions[g] is not None:
                if t.device != group.source_device or _end_ptrs(row) != binding.region_ptrs[g]:
                    return False
                continue
            pointer = distributed.POINTER[group.kind]
            try:
                if [pointer(tbl[a]) for tbl, a in row] != binding.ptrs[g]:
                    return False  # re-allocated: shapes may differ, and the gathered views are stale
            except AttributeError:
                return False  # not held as when bound (an FSDP2 root left unsharded by a no_grad forward)
        return True


def _end_ptrs(row: list[tuple[dict, str]]) -> tuple[int, int]:
    (t0, a0), (t1, a1) = row[0], row[-1]
    return t0[a0].data_ptr(), t1[a1].data_ptr()


def _flat_region(tensors: list[Tensor], group: Group) -> Tensor | None:
    """One 1-D view over ``tensors`` if they sit in one storage laid out exactly like ``group``'s buffer.

    True for parameters made contiguous by :func:`emakit.contiguous_parameters_`: then the
    whole group updates as one array.
    """
    if not tensors:
        return None
    first = tensors[0]
    base = first.storage_offset()
    storage = first.untyped_storage().data_ptr()
    for t, off, stride in zip(tensors, group.offsets, group.strides):
        if (
            t.untyped_storage().data_ptr() != storage
            or t.storage_offset() != base + off
            or (t.stride() != stride and t.numel() > 1)
        ):
            return None
    return first.detach().as_strided((group.numel,), (1,), base)
