"""Storage and bookkeeping shared by every average of a model's weights.

An ``_Averager`` holds ``K`` averages ("profiles") of a model's tensors. It decides what is
averaged, copied or left in the model; stores the averages in one flat buffer per group of
tensors that share dtypes and devices (views per name); binds to any view of the model
(DDP, compiled) by normalised names; and runs the update kernels. It knows nothing about
schedules or time: the public classes (``EMA``, ``PowerEMA``) supply the coefficients.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed, kernels
from ._model import Slot, default_average_dtype, is_float, model_slots, normalize_name

_BUFFER_MODES = ("average", "copy")
_STATE_VERSION = 1


@dataclass
class _Layout:
    """How one group is cut into chunks: pieces per batch, for every profile and the scratch."""

    batches: list[list[kernels.Piece]]
    pieces: list[list[list[Tensor]]]  # [profile][batch] -> tensors
    scratch: list[list[Tensor]] | None  # [batch] -> staging tensors, or None when not staged


def _cut(targets: list[list[Tensor]], shapes: list[torch.Size], scratch: Tensor | None, chunk: int) -> _Layout:
    """Layout for tensors whose per-profile targets are ``targets[k][i]`` (dense, shaped ``shapes[i]``)."""
    numels = [s.numel() for s in shapes]
    batches = kernels.plan_pieces(numels, chunk)
    flats: list[dict[int, Tensor]] = [{} for _ in targets]

    def piece_of(k: int, p: kernels.Piece) -> Tensor:
        t = targets[k][p.index]
        if p.whole:
            return t
        flat = flats[k].get(p.index)
        if flat is None:
            flat = flats[k][p.index] = kernels.flat_view(t)
        return flat[p.start : p.start + p.numel]

    pieces = [[[piece_of(k, p) for p in batch] for batch in batches] for k in range(len(targets))]
    staged = None
    if scratch is not None:
        staged = []
        for batch in batches:
            row, offset = [], 0
            for p in batch:
                view = scratch[offset : offset + p.numel]
                row.append(view.view(shapes[p.index]) if p.whole else view)
                offset += p.numel
            staged.append(row)
    return _Layout(batches, pieces, staged)


@dataclass
class _Gather:
    """One batch of consecutive small tensors: ``small[first:last]`` of the group."""

    first: int
    last: int
    targets: list[Tensor]  # per profile: the batch's contiguous slice of the buffer
    gathered: Tensor  # scratch slice in the source dtype
    staged: Tensor | None  # scratch slice in the average's dtype, when they differ


@dataclass
class _Group:
    """Averaged tensors sharing (kind, source dtype/device, average dtype/device), stored flat."""

    kind: str  # how the sources are held: see emakit.distributed (local, dtensor, rows, zero3)
    is_param: bool
    source_dtype: torch.dtype
    source_device: torch.device
    dtype: torch.dtype
    device: torch.device
    names: list[str]
    layouts: list[distributed.Layout | None]  # per tensor: its global layout when sharded
    shapes: list[torch.Size]  # of this rank's local parts (the whole tensors when not sharded)
    strides: list[tuple[int, ...]]
    offsets: list[int]
    buffer: Tensor  # (K, numel)
    views: list[list[Tensor]]  # [profile][tensor]
    staged: bool  # source dtype/device differ from the average's
    # Large tensors: one fused call over whole tensors, or chunked (``layout``) when staged or K > 1.
    big: list[int] = field(default_factory=list)
    big_views: list[Tensor] = field(default_factory=list)  # profile 0's views of those tensors
    layout: _Layout | None = None
    # Runs of consecutive small tensors: gathered into a scratch with one ``torch.cat`` per
    # batch, then one ``lerp_`` per average on the matching contiguous slice of ``buffer``.
    small: list[int] = field(default_factory=list)
    gathers: list[_Gather] = field(default_factory=list)
    region_layout: _Layout | None = None  # one flat source region, built on first need

    @property
    def numel(self) -> int:
        return self.buffer.shape[1]


@dataclass
class _Binding:
    """A model bound to the averages: where to read each tensor, checked once."""

    sources: list[list[tuple[dict, str]]]  # per group: (table, attr) per tensor
    locals: list[list[Tensor]]  # per group: the part of each tensor this rank averages
    big: list[list[Tensor]]  # per group: local parts of the large tensors
    small_flat: list[list[Tensor]]  # per group: 1-D views of the small ones
    ptrs: list[list[int]]  # per group: data pointers of all sources when bound (a change: re-allocated)
    copies: list[tuple[dict, str]]
    regions: list[Tensor | None]  # per group: one flat view over all its sources, if laid out so
    region_ptrs: list[tuple[int, int] | None]


@dataclass
class _Spec:
    """What goes where, decided once at construction."""

    average: list[str] = field(default_factory=list)
    copy: list[str] = field(default_factory=list)
    live: list[str] = field(default_factory=list)


class _Averager:
    """``K`` averages of a model's tensors. Subclasses supply the update coefficients."""

    #: ``state_dict()["format"]`` of the subclass.
    _format = "emakit.averager"

    def __init__(
        self,
        model: nn.Module,
        schedules: list[Callable[[float, float], float]],
        *,
        buffers: str = "average",
        include: Callable[[str], bool] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        skip_nonfinite: bool = False,
        shard: Any = False,
    ) -> None:
        owner = type(self).__name__
        num_profiles = len(schedules)
        if not isinstance(model, nn.Module):
            raise TypeError(f"{owner}: model must be a torch.nn.Module, got {type(model).__name__}")
        if buffers not in _BUFFER_MODES:
            raise ValueError(f"{owner}: buffers must be one of {_BUFFER_MODES}, got buffers={buffers!r}")
        if include is not None and not callable(include):
            raise TypeError(f"{owner}: include must be a callable name -> bool, got {include!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"{owner}: dtype must be a floating torch.dtype or None, got dtype={dtype!r}")
        distributed.check_model(owner, model)
        rows_mesh = distributed.default_mesh(owner, shard)
        self._owner = owner
        self._model = model
        self._buffers_mode = buffers
        self._dtype = dtype
        self._device = torch.device(device) if device is not None else None
        self._swapped = False

        distributed.reshard(model)  # FSDP2: the sharded parameters are the ones registered
        slots, self._aliases = model_slots(model)
        spec = _Spec()
        tensors: dict[str, Tensor] = {}
        for name, slot in slots.items():
            t = slot.get()
            tensors[name] = t
            included = include is None or bool(include(name))
            if slot.is_param:
                kind = "average" if (included and t.requires_grad and is_float(t)) else "live"
            elif not included:
                kind = "live"
            elif is_float(t) and buffers == "average":
                kind = "average"
            else:
                kind = "copy"  # integer / bool buffers, and float buffers with buffers="copy"
            getattr(spec, kind).append(name)
        for name in spec.copy:
            if type(tensors[name].detach()) is not Tensor:
                raise NotImplementedError(
                    f"{owner}: buffer {name!r} is a {type(tensors[name]).__name__}; non-floating buffers are "
                    f"copied whole and must be plain tensors"
                )
        self._spec = spec
        self._slots = slots
        self._rows_mesh = rows_mesh

        # Group the averaged tensors (this rank's parts of them) and allocate one flat
        # (K, numel) buffer per group.
        grouped: dict[tuple, list[str]] = {}
        local: dict[str, Tensor] = {}
        layouts: dict[str, distributed.Layout | None] = {}
        for name in spec.average:
            t = tensors[name]
            kind, layouts[name], local[name] = distributed.classify(t, rows_mesh)
            avg_dtype = dtype or default_average_dtype(t.dtype)
            avg_device = self._device or local[name].device
            key = (kind, slots[name].is_param, t.dtype, local[name].device, avg_dtype, avg_device)
            grouped.setdefault(key, []).append(name)
        self._groups: list[_Group] = []
        self._scratch: dict[tuple, Tensor] = {}
        with torch.no_grad():
            for (kind, is_param, src_dtype, src_device, avg_dtype, avg_device), names in grouped.items():
                self._groups.append(
                    self._make_group(
                        kind,
                        names,
                        local,
                        [layouts[n] for n in names],
                        num_profiles,
                        is_param,
                        src_dtype,
                        src_device,
                        avg_dtype,
                        avg_device,
                    )
                )
            self._copies = {
                name: tensors[name].detach().to(self._device or tensors[name].device, copy=True) for name in spec.copy
            }
        self._num_profiles = num_profiles
        self._bindings: weakref.WeakKeyDictionary[nn.Module, _Binding] = weakref.WeakKeyDictionary()
        self._schedules = list(schedules)
        self.skip_nonfinite = bool(skip_nonfinite)
        #: Time of the last update, in the caller's unit (0 at construction).
        self.t: float = 0
        #: Updates applied, and updates skipped because the model held NaN/Inf.
        self.num_updates = 0
        self.num_skipped = 0

    # ------------------------------------------------------------------ time

    def _advance(self, model: nn.Module | None, t: float | None, dt: float | None) -> list[float]:
        """One update: checks everything, then moves every profile; returns the decays."""
        self._assert_not_swapped("update")
        new_t, step = next_time(self._owner, self.t, t, dt)
        decays = [check_decay(self._owner, s, new_t, step) for s in self._schedules]
        binding = self._fresh_binding(model)
        if self.skip_nonfinite and not self._all_finite(binding):
            warnings.warn(
                f"{self._owner}: skipped the update at t={new_t}: the model holds NaN or Inf; the averages are "
                f"unchanged and time moves on",
                RuntimeWarning,
                stacklevel=3,
            )
            self.num_skipped += 1
        else:
            self._apply(binding, [1.0 - d for d in decays])
            self.num_updates += 1
        self.t = new_t
        return decays

    # ------------------------------------------------------------------ construction

    def _make_group(
        self,
        kind: str,
        names: list[str],
        tensors: dict[str, Tensor],
        layouts: list[distributed.Layout | None],
        k: int,
        is_param: bool,
        src_dtype: torch.dtype,
        src_device: torch.device,
        dtype: torch.dtype,
        device: torch.device,
    ) -> _Group:
        shapes, strides, offsets = [], [], []
        total = 0
        for name in names:
            t = tensors[name]
            if not kernels.is_dense(t):
                raise ValueError(
                    f"{self._owner}: tensor {name!r} (shape {tuple(t.shape)}, stride {t.stride()}) "
                    f"has gaps or overlaps in memory; averaging needs dense tensors"
                )
            shapes.append(t.shape)
            # Keep the source's memory format (e.g. channels_last) so chunks line up element for element.
            strides.append(t.stride() if not t.is_contiguous() else _contiguous_strides(t.shape))
            offsets.append(total)
            total += t.numel()
        buffer = torch.empty((k, total), dtype=dtype, device=device)
        views = [
            [buffer[j].as_strided(s, st, buffer[j].storage_offset() + o) for s, st, o in zip(shapes, strides, offsets)]
            for j in range(k)
        ]
        for j in range(k):
            torch._foreach_copy_(views[j], [tensors[n].detach() for n in names])
        staged = src_dtype != dtype or src_device != device
        group = _Group(
            kind,
            is_param,
            src_dtype,
            src_device,
            dtype,
            device,
            names,
            layouts,
            shapes,
            strides,
            offsets,
            buffer,
            views,
            staged,
        )
        chunk = kernels.chunk_numel(device)
        # Small tensors are gathered with torch.cat, which needs sources on the average's device.
        small_ok = src_device == device
        batches: list[list[int]] = [[]]
        batch_numel = 0
        for i, shape in enumerate(shapes):
            n = shape.numel()
            if not (small_ok and 0 < n <= kernels.SMALL_NUMEL):
                group.big.append(i)
                batches.append([])  # a large tensor ends the run of consecutive small ones
                batch_numel = 0
                continue
            if batch_numel + n > chunk:
                batches.append([])
                batch_numel = 0
            batches[-1].append(i)
            batch_numel += n
        for batch in (b for b in batches if b):
            first = len(group.small)
            group.small.extend(batch)
            start, numel = offsets[batch[0]], sum(shapes[j].numel() for j in batch)
            gathered = self._scratch_for(src_dtype, device, numel)[:numel]
            staged_view = self._scratch_for(dtype, device, numel)[:numel] if staged else None
            targets = [buffer[j, start : start + numel] for j in range(k)]
            group.gathers.append(_Gather(first, len(group.small), targets, gathered, staged_view))
        group.big_views = [views[0][i] for i in group.big]
        if group.big and (staged or k > 1):
            big_views = [[views[j][i] for i in group.big] for j in range(k)]
            need = min(chunk, sum(shapes[i].numel() for i in group.big))
            scratch = self._scratch_for(dtype, device, need) if staged else None
            group.layout = _cut(big_views, [shapes[i] for i in group.big], scratch, chunk)
        return group

    def _scratch_for(self, dtype: torch.dtype, device: torch.device, numel: int) -> Tensor:
        """A scratch buffer of at least ``numel`` elements, shared by the groups (they run one by one).

        Growing it leaves earlier slices on the old buffer, which stays alive through them.
        """
        key = (dtype, device)
        have = self._scratch.get(key)
        if have is None or have.numel() < numel:
            self._scratch[key] = have = torch.empty(numel, dtype=dtype, device=device)
        return have

    # ------------------------------------------------------------------ binding to a model

    def _bind(self, model: nn.Module | None) -> _Binding:
        model = self._model if model is None else model
        binding = self._bindings.get(model)
        if binding is None:
            binding = self._bindings[model] = self._make_binding(model)
        return binding

    def _make_binding(self, model: nn.Module) -> _Binding:
        """Match ``model``'s tensors to ours by normalised name; raise naming the first mismatch."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"{self._owner}: model must be a torch.nn.Module, got {type(model).__name__}")
        distributed.check_model(self._owner, model)
        distributed.reshard(model)
        slots, _ = model_slots(model)
        missing = [n for n in self._slots if n not in slots]
        if missing:
            raise ValueError(
                f"{self._owner}: the model has no tensor named {missing[0]!r} "
                f"({len(missing)} of {len(self._slots)} names missing)"
            )
        unexpected = [n for n in slots if n not in self._slots]
        if unexpected:
            raise ValueError(
                f"{self._owner}: the model has a tensor {unexpected[0]!r} that this average "
                f"does not track ({len(unexpected)} unexpected names)"
            )
        sources, locals_ = [], []
        for group in self._groups:
            row, parts = [], []
            for i, name in enumerate(group.names):
                parts.append(self._check_slot(slots[name], group, i))
                row.append((slots[name].table, slots[name].attr))
            sources.append(row)
            locals_.append(parts)
        copies = []
        for name, stored in self._copies.items():
            t = slots[name].get()
            if type(t.detach()) is not Tensor or t.shape != stored.shape or t.dtype != stored.dtype:
                raise ValueError(
                    f"{self._owner}: buffer {name!r} is a {type(t).__name__} of shape {tuple(t.shape)} and dtype "
                    f"{t.dtype} in the model, expected a tensor of shape {tuple(stored.shape)} and dtype {stored.dtype}"
                )
            copies.append((slots[name].table, slots[name].attr))
        big, small_flat, all_ptrs = [], [], []
        for group, row, parts in zip(self._groups, sources, locals_):
            big.append([parts[i] for i in group.big])
            small_flat.append([kernels.flat_view(parts[i]) for i in group.small])
            pointer = distributed.POINTER[group.kind]
            all_ptrs.append([pointer(tbl[a]) for tbl, a in row])
        regions, ptrs = [], []
        for group, row, parts in zip(self._groups, sources, locals_):
            region = _flat_region(parts, group) if group.kind == "local" else None
            regions.append(region)
            if region is None:
                ptrs.append(None)
            else:
                ptrs.append(_end_ptrs(row))
                if group.region_layout is None and (group.staged or group.buffer.shape[0] > 1):
                    chunk = kernels.chunk_numel(group.device)
                    group.region_layout = _cut(
                        [[group.buffer[j]] for j in range(group.buffer.shape[0])],
                        [torch.Size([group.numel])],
                        self._scratch_for(group.dtype, group.device, min(chunk, group.numel)) if group.staged else None,
                        chunk,
                    )
        return _Binding(sources, locals_, big, small_flat, all_ptrs, copies, regions, ptrs)

    def _check_slot(self, slot: Slot, group: _Group, i: int) -> Tensor:
        """Check the model's tensor against what was averaged; return the part this rank averages."""
        t = slot.get()
        layout = group.layouts[i]
        kind, _, local = distributed.classify(t, self._rows_mesh)
        if kind != group.kind:
            raise ValueError(
                f"{self._owner}: tensor {slot.name!r} is held as {kind!r} in the model, but the average was "
                f"built on a {group.kind!r} one (see emakit.distributed); build the average on the model as "
                f"it is trained"
            )
        shape = layout.model_shape if layout is not None else group.shapes[i]
        model_shape = torch.Size(t.ds_shape) if kind == "zero3" else t.shape
        if model_shape != shape:
            raise ValueError(
                f"{self._owner}: tensor {slot.name!r} has shape {tuple(model_shape)} in the model, expected {tuple(shape)}"
            )
        if t.dtype != group.source_dtype:
            raise ValueError(
                f"{self._owner}: tensor {slot.name!r} has dtype {t.dtype} in the model, expected "
                f"{group.source_dtype} (the dtype it had when the average was created)"
            )
        if local.shape != group.shapes[i]:
            raise ValueError(
                f"{self._owner}: this rank holds a part of shape {tuple(local.shape)} of tensor {slot.name!r}, "
                f"expected {tuple(group.shapes[i])}: the model is sharded differently than when the average "
                f"was created (load a checkpoint into a new average to change the sharding)"
            )
        if local.device != group.source_device:
            raise ValueError(
                f"{self._owner}: tensor {slot.name!r} is on {local.device} in the model, expected {group.source_device}"
            )
        return local

    def _fresh_binding(self, model: nn.Module | None) -> _Binding:
        """The binding, re-checked cheaply; rebuilt (and so re-validated) when the model's tensors
        were re-allocated, moved or cast since it was made. Nothing has changed when this raises."""
        target = self._model if model is None else model
        binding = self._bind(target)
        if not self._still_valid(binding):
            del self._bindings[target]
            binding = self._bind(target)  # raises the precise error if the model no longer fits
        return binding

    def _still_valid(self, binding: _Binding) -> bool:
        for g, (group, row) in enumerate(zip(self._groups, binding.sources)):
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

    # ------------------------------------------------------------------ the update

    def _assert_not_swapped(self, what: str) -> None:
        if self._swapped:
            raise RuntimeError(
                f"{self._owner}.{what}() called inside swapped(): the model holds the averaged "
                f"weights there; leave the with-block first"
            )

    @staticmethod
    def _all_finite(binding: _Binding) -> bool:
        norms: dict[torch.device, list[Tensor]] = {}
        for tensors in binding.locals:
            if tensors:
                norms.setdefault(tensors[0].device, []).extend(torch._foreach_norm(tensors, float("inf")))
        # One host synchronisation per device, only when the non-finite guard is on.
        return all(bool(torch.isfinite(torch.stack([n.float() for n in ns])).all()) for ns in norms.values())

    @torch.no_grad()
    def _apply(self, binding: _Binding, coefficients: list[float]) -> None:
        """Move profile ``k`` by ``coefficients[k] = 1 - decay_k`` toward the bound model."""
        for g, group in enumerate(self._groups):
            region = binding.regions[g]
            if region is not None:  # the sources are one flat array laid out like ours
                if group.region_layout is None:
                    kernels.lerp_([group.buffer[0]], [region], coefficients[0])
                else:
                    layout = group.region_layout
                    kernels.multi_lerp_(layout.pieces, [region], layout.batches, coefficients, layout.scratch)
                continue
            if group.big:
                sources = binding.big[g]
                if group.layout is None:
                    kernels.lerp_(group.big_views, sources, coefficients[0])
                else:
                    layout = group.layout
                    kernels.multi_lerp_(layout.pieces, sources, layout.batches, coefficients, layout.scratch)
            flat = binding.small_flat[g]
            for batch in group.gathers:
                kernels.gather_lerp_(
                    batch.targets, flat[batch.first : batch.last], batch.gathered, batch.staged, coefficients
                )
        if binding.copies:
            dst = list(self._copies.values())
            src = [tbl[a] for tbl, a in binding.copies]
            for d, s in zip(dst, src):
                d.copy_(s)

    # ------------------------------------------------------------------ reading the averages

    def _average_tensors(self, k: int) -> Iterator[tuple[str, Tensor, _Group, int]]:
        """Profile ``k``'s averages as stored: this rank's local parts."""
        for group in self._groups:
            for i, name in enumerate(group.names):
                yield name, group.views[k][i], group, i

    def _state_tensors(self, k: int) -> dict[str, Tensor]:
        """Profile ``k``'s averages with their global layout: DTensors where sharded (sharing memory)."""
        out = {}
        for name, view, group, i in self._average_tensors(k):
            layout = group.layouts[i]
            out[name] = view if layout is None else layout.wrap(view)
        return out

    @property
    def is_sharded(self) -> bool:
        """Whether some average is split across ranks (FSDP2, ZeRO-3, or ``shard=True``)."""
        return any(g.kind != "local" for g in self._groups)

    def _averaged_state_dict(self, k: int, dtype: str, full: bool = False) -> dict[str, Tensor]:
        if dtype not in ("model", "average"):
            raise ValueError(f"{self._owner}.averaged_state_dict: dtype must be 'model' or 'average', got {dtype!r}")
        if not isinstance(full, bool):
            raise TypeError(f"{self._owner}.averaged_state_dict: full must be a bool, got full={full!r}")
        values: dict[str, Any] = {}
        for name, view, group, i in self._average_tensors(k):
            local = view.to(group.source_dtype) if dtype == "model" else view
            layout = group.layouts[i]
            values[name] = local if layout is None else layout.wrap(local)
        values.update(self._copies)
        distributed.reshard(self._model)
        out: dict[str, Any] = {}
        for raw, value in self._model.state_dict().items():
            name = normalize_name(raw)
            primary = self._aliases.get(name, name)
            out[name] = values.get(primary, value)
        if full:
            flat = self._flat_names()
            full_sd = distributed.gather_full(out)
            for name, value in full_sd.items():
                shape = flat.get(self._aliases.get(name, name))
                if shape is not None:
                    full_sd[name] = value.view(shape)
            return full_sd
        return out

    def _model_shapes(self) -> dict[str, torch.Size]:
        """The model's shape of every averaged tensor."""
        return {
            n: (lay.model_shape if lay is not None else shape)
            for g in self._groups
            for n, lay, shape in zip(g.names, g.layouts, g.shapes)
        }

    def _flat_names(self) -> dict[str, torch.Size]:
        """Averages stored flattened (DeepSpeed ZeRO-3), with the model's shape for each."""
        return {
            n: lay.model_shape
            for g in self._groups
            for n, lay in zip(g.names, g.layouts)
            if lay is not None and lay.shape != lay.model_shape
        }

    def _swap_pairs(self, binding: _Binding) -> list[tuple[Tensor, _Group, int, bool]]:
        """``(model memory, group, index, takes the full average)`` for everything a swap writes."""
        pairs = []
        for g, (group, row) in enumerate(zip(self._groups, binding.sources)):
            for i, (tbl, attr) in enumerate(row):
                local, layout = binding.locals[g][i], group.layouts[i]
                for target, full in distributed.swap_targets(group.kind, tbl[attr], local, layout):
                    pairs.append((target, group, i, full))
        return pairs

    @torch.no_grad()
    def _copy_into(self, binding: _Binding, k: int) -> None:
        for target, group, i, full in self._swap_pairs(binding):
            target.copy_(distributed.swap_value(group.views[k][i], group.layouts[i], full))
        for (tbl, attr), stored in zip(binding.copies, self._copies.values()):
            tbl[attr].copy_(stored)

    @contextlib.contextmanager
    def _swap(self, model: nn.Module | None, k: int, backup_device: torch.device | str | None) -> Iterator[None]:
        self._assert_not_swapped("swapped")
        target_model = self._model if model is None else model
        binding = self._fresh_binding(model)
        targets = [t for t, _, _, _ in self._swap_pairs(binding)] + [tbl[a] for tbl, a in binding.copies]
        with torch.no_grad():
            backup = [t.detach().to(backup_device or t.device, copy=True) for t in targets]
            self._copy_into(binding, k)
        self._swapped = True
        try:
            yield
        finally:
            self._swapped = False
            # FSDP2: a no_grad forward inside left the root unsharded, holding the averages.
            distributed.reshard(target_model)
            with torch.no_grad():
                for t, saved in zip(targets, backup):
                    t.copy_(saved)

    # ------------------------------------------------------------------ state

    def _config(self) -> dict[str, Any]:
        return {
            "buffers": self._buffers_mode,
            "dtypes": ",".join(sorted({str(g.dtype) for g in self._groups})),
        }

    def _check_config(self, where: str, stored: Mapping[str, Any]) -> None:
        """Warn about stored settings that differ from ours; ours are kept. Subclasses may raise."""
        diffs = [
            f"{k}: stored {stored[k]!r}, this one {v!r}"
            for k, v in self._config().items()
            if k in stored and stored[k] != v
        ]
        if diffs:
            warnings.warn(
                f"{where}: the state dict was saved with other settings; keeping this "
                f"{self._owner}'s ({'; '.join(diffs)})",
                stacklevel=3,
            )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: averages and copies by name, time, counters, config.

        Round-trips through ``torch.save`` / ``torch.load(weights_only=True)``. The tensors
        share memory with the average.
        """
        return {
            "format": self._format,
            "version": _STATE_VERSION,
            "t": self.t,
            "num_updates": self.num_updates,
            "num_skipped": self.num_skipped,
            "config": self._config(),
            "averages": [self._state_tensors(k) for k in range(self._num_profiles)],
            "copies": dict(self._copies),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; continuing gives bit-identical results to never stopping.

        Everything is checked before anything changes: a wrong format, a missing or
        unexpected name or a wrong shape raises and leaves the average as it was. This
        object's own settings (schedule, dtype, device) are kept; stored settings that
        differ are reported with a warning.
        """
        where = f"{self._owner}.load_state_dict"
        self._assert_not_swapped("load_state_dict")
        t, counts = self._check_header(where, state_dict)
        averages = state_dict.get("averages")
        if not isinstance(averages, (list, tuple)) or len(averages) != self._num_profiles:
            raise ValueError(
                f"{where}: 'averages' must be a list of {self._num_profiles} name -> tensor mappings "
                f"(one per profile), got {type(averages).__name__}"
                f"{f' of {len(averages)}' if isinstance(averages, (list, tuple)) else ''}"
            )
        for profile in averages:
            self._check_tensor_state(where, profile, state_dict.get("copies"))
        for k, profile in enumerate(averages):
            self._load_tensors(where, k, profile, state_dict["copies"])
        self.t = t
        self.num_updates = counts["num_updates"]
        self.num_skipped = counts["num_skipped"]

    def _check_header(self, where: str, state_dict: Mapping[str, Any]) -> tuple[float, dict[str, int]]:
        """Check everything but the tensors; returns ``(t, counters)``."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{where}: expected a mapping, got {type(state_dict).__name__}")
        if state_dict.get("format") != self._format:
            hint = " (a model state dict? use load_averaged_state_dict)" if "format" not in state_dict else ""
            raise ValueError(
                f"{where}: not a {self._owner} state dict: format={state_dict.get('format')!r}, "
                f"expected {self._format!r}{hint}"
            )
        version = state_dict.get("version")
        if not isinstance(version, int) or version > _STATE_VERSION:
            raise ValueError(
                f"{where}: state dict version {version!r} is not supported (this emakit reads up to {_STATE_VERSION})"
            )
        t = check_time(where, state_dict.get("t"))
        counts = {}
        for key in ("num_updates", "num_skipped"):
            value = state_dict.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{where}: {key} must be an int >= 0, got {key}={value!r}")
            counts[key] = value
        stored = state_dict.get("config", {})
        if not isinstance(stored, Mapping):
            raise ValueError(f"{where}: 'config' must be a mapping, got {type(stored).__name__}")
        self._check_config(where, stored)
        return t, counts

    # ------------------------------------------------------------------ saving itself (DCP)

    _HEADER = ("format", "version", "t", "num_updates", "num_skipped")

    def save(self, path: str | os.PathLike) -> Path:
        """Save this average as a ``torch.distributed.checkpoint`` directory at ``path``.

        Works in one process and in a distributed run, where it is collective: call it on
        every rank with the same path; each rank writes only the parts it holds (nothing is
        gathered). Written under a hidden name and renamed when complete; an existing path
        is never replaced. Resume with :meth:`load`, on any number of ranks. To save the
        average inside your own checkpoint instead, put the object in the dict given to
        ``dcp.save`` (it is a DCP ``Stateful``).
        """
        self._assert_not_swapped("save")
        return distributed.dcp_save_atomic(f"{self._owner}.save", self.state_dict(), Path(path))

    def load(self, path: str | os.PathLike) -> None:
        """Resume from a :meth:`save` directory, written by any number of ranks (resharded on load).

        Collective in a distributed run. Format, settings, names and shapes are checked
        against the checkpoint's metadata before any tensor is read; then each rank reads
        its own parts straight into the averages. DCP metadata is pickled: load only
        checkpoints you trust.
        """
        where = f"{self._owner}.load"
        self._assert_not_swapped("load")
        path = Path(path)
        meta = distributed.dcp_metadata(where, path).state_dict_metadata
        # The small entries first: format, version, time, counters, settings.
        keys = [k for k in meta if k in self._HEADER or k.startswith("config.")]
        small: dict[str, Any] = dict.fromkeys(keys)
        distributed.dcp_load(small, path, flatten=False)
        header = {k: v for k, v in small.items() if not k.startswith("config.")}
        header["config"] = {k.removeprefix("config."): v for k, v in small.items() if k.startswith("config.")}
        t, counts = self._check_header(where, header)
        state = self.state_dict()
        tensors = {f"averages.{k}.{n}": v for k, profile in enumerate(state["averages"]) for n, v in profile.items()}
        tensors.update({f"copies.{n}": v for n, v in state["copies"].items()})
        for key, tensor in tensors.items():
            size = getattr(meta.get(key), "size", None)
            if size is None:
                raise KeyError(f"{where}: {path} holds no tensor {key!r}; it was saved from another model or average")
            if tuple(size) != tuple(tensor.shape):
                raise ValueError(
                    f"{where}: {path} holds {key!r} with shape {tuple(size)}, expected {tuple(tensor.shape)}"
                )
        # Each rank reads its own parts straight into the averages (they share memory with ``state``).
        distributed.dcp_load(state, path)
        self.t = t
        self.num_updates = counts["num_updates"]
        self.num_skipped = counts["num_skipped"]

    def _check_tensor_state(self, where: str, averages: Mapping[str, Any], copies: Mapping[str, Any]) -> None:
        """Raise naming the first key whose presence, type or shape does not match."""
        flat = self._flat_names()
        for label, given, expected in (
            ("averages", averages, self._state_tensors(0)),
            ("copies", copies, self._copies),
        ):
            if not isinstance(given, Mapping):
                raise TypeError(f"{where}: {label!r} must be a mapping of name -> tensor, got {type(given).__name__}")
            for name in expected:
                if name not in given:
                    raise KeyError(f"{where}: missing tensor {name!r} in {label!r}")
            for name, value in given.items():
                if name not in expected:
                    raise KeyError(
                        f"{where}: unexpected tensor {name!r} in {label!r}; this {self._owner} does not track it"
                    )
                if not isinstance(value, Tensor):
                    raise TypeError(f"{where}: {label}[{name!r}] must be a tensor, got {type(value).__name__}")
                if value.shape != expected[name].shape and value.shape != flat.get(name):
                    raise ValueError(
                        f"{where}: {label}[{name!r}] has shape {tuple(value.shape)}, expected "
                        f"{tuple(expected[name].shape)}"
                    )

    @torch.no_grad()
    def _load_tensors(self, where: str, k: int, averages: Mapping[str, Tensor], copies: Mapping[str, Tensor]) -> None:
        cast = sorted(
            {str(averages[n].dtype) for n, v, _, _ in self._average_tensors(k) if averages[n].dtype != v.dtype}
        )
        if cast:
            warnings.warn(
                f"{where}: averages stored as {', '.join(cast)} were cast to this {self._owner}'s "
                f"dtype; its precision is unchanged",
                stacklevel=3,
            )
        for name, view, group, i in self._average_tensors(k):
            value = averages[name]
            layout = group.layouts[i]
            if layout is not None:
                value = layout.local_of(value)  # this rank's part (resharded if saved otherwise)
            elif distributed.is_dtensor(value):
                value = value.full_tensor()
            if value.data_ptr() != view.data_ptr() or value.stride() != view.stride():
                view.copy_(value)  # (DCP loads in place: then the value *is* the view)
        for name, stored in self._copies.items():
            value = copies[name]
            stored.copy_(value.full_tensor() if distributed.is_dtensor(value) else value)


def next_time(owner: str, now: float, t: float | None, dt: float | None) -> tuple[float, float]:
    """The ``(t, dt)`` of the next update from ``t`` and/or ``dt``; one step when neither is given."""
    for label, value in (("t", t), ("dt", dt)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"{owner}.update: {label} must be a number, got {label}={value!r}")
    if t is None:
        dt = 1 if dt is None else dt
        if not dt > 0 or math.isinf(dt):
            raise ValueError(f"{owner}.update: dt must be a finite number > 0, got dt={dt}")
        return now + dt, dt
    if not t > now or math.isinf(t):
        raise ValueError(f"{owner}.update: t must be finite and later than the current time {now}, got t={t}")
    if dt is not None and not math.isclose(now + dt, t, rel_tol=1e-12, abs_tol=1e-12):
        raise ValueError(
            f"{owner}.update: t and dt disagree: the current time is {now}, so t={t} means dt={t - now}, got dt={dt}"
        )
    return t, t - now


def check_decay(owner: str, schedule: Any, t: float, dt: float) -> float:
    """``schedule(t, dt)`` as a float, or an error naming the schedule and the value."""
    decay = schedule(t, dt)
    try:
        decay = float(decay)
    except (TypeError, ValueError):
        raise TypeError(
            f"{owner}: schedule {schedule!r} returned {decay!r} at t={t}, dt={dt}; expected a float decay in [0, 1]"
        ) from None
    if not 0.0 <= decay <= 1.0:
        raise ValueError(
            f"{owner}: schedule {schedule!r} returned decay={decay} at t={t}, dt={dt}; expected a value in [0, 1]"
        )
    return decay


def check_time(where: str, t: Any) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise ValueError(f"{where}: t must be a finite number >= 0, got t={t!r}")
    return t


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def _end_ptrs(row: list[tuple[dict, str]]) -> tuple[int, int]:
    (t0, a0), (t1, a1) = row[0], row[-1]
    return t0[a0].data_ptr(), t1[a1].data_ptr()


def _flat_region(tensors: list[Tensor], group: _Group) -> Tensor | None:
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
