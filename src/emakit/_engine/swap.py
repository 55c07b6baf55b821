"""Putting the averages to use: into a model's memory (copy, swap) or as the model's state dict.

Owns the writes into a bound model (:func:`copy_into`, :func:`swapped`, which backs up what
it overwrites and restores it, also on error), the one write the other way (:func:`copy_from`:
the model into the averages, for a restart) and :func:`averaged_state_dict`, the model's
own state dict with the averaged values in place. Where sharding decides what a write
touches (a DDP-split average is gathered, ZeRO-3 keeps gathered copies) it asks
:mod:`emakit.distributed`.

Besides :func:`copy_from` it never changes the averages; never the time or the binding's cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed
from .binding import Binding
from .model import normalize_name
from .storage import Group, Storage


def _swap_pairs(storage: Storage, binding: Binding) -> list[tuple[Tensor, Group, int, bool]]:
    """``(model memory, group, index, takes the full average)`` for everything a swap writes."""
    pairs = []
    for g, (group, row) in enumerate(zip(storage.groups, binding.sources)):
        for i, (tbl, attr) in enumerate(row):
            local, layout = binding.locals[g][i], group.layouts[i]
            for target, full in distributed.swap_targets(group.kind, tbl[attr], local, layout):
                pairs.append((target, group, i, full))
    return pairs


@torch.no_grad()
def copy_into(storage: Storage, binding: Binding, k: int) -> None:
    """Write profile ``k``'s averages and the copied tensors into the bound model."""
    for target, group, i, full in _swap_pairs(storage, binding):
        target.copy_(distributed.swap_value(group.views[k][i], group.layouts[i], full))
    for (tbl, attr), stored in zip(binding.copies, storage.copies.values()):
        tbl[attr].copy_(stored)


@torch.no_grad()
def copy_from(storage: Storage, binding: Binding) -> None:
    """Write the bound model's tensors into every profile's averages and into the copies (a restart)."""
    for g, group in enumerate(storage.groups):
        for k in range(storage.num_profiles):
            torch._foreach_copy_(group.views[k], binding.locals[g])
    for stored, (tbl, attr) in zip(storage.copies.values(), binding.copies):
        stored.copy_(tbl[attr])


@contextlib.contextmanager
def swapped(
    storage: Storage, binding: Binding, model: nn.Module, k: int, backup_device: torch.device | str | None
) -> Iterator[None]:
    """The bound ``model`` holds profile ``k`` inside the block, its own tensors again after (also on error)."""
    targets = [t for t, _, _, _ in _swap_pairs(storage, binding)] + [tbl[a] for tbl, a in binding.copies]
    with torch.no_grad():
        backup = [t.detach().to(backup_device or t.device, copy=True) for t in targets]
        copy_into(storage, binding, k)
    try:
        yield
    finally:
        # FSDP2: a no_grad forward inside left the root unsharded, holding the averages.
        distributed.reshard(model)
        with torch.no_grad():
            for t, saved in zip(targets, backup):
                t.copy_(saved)


def averaged_state_dict(
    owner: str,
    storage: Storage,
    model: nn.Module,
    aliases: dict[str, str],
    k: int,
    dtype: str | torch.dtype,
    full: bool = False,
) -> dict[str, Tensor]:
    """``model``'s state dict (plain keys) with profile ``k``'s averages and the copies in place.

    ``dtype``: ``"model"`` (each average cast to its model tensor's dtype), ``"average"`` (as
    stored) or a floating ``torch.dtype`` (every average cast to it).
    """
    if not (dtype in ("model", "average") or (isinstance(dtype, torch.dtype) and dtype.is_floating_point)):
        raise ValueError(
            f"{owner}.averaged_state_dict: dtype must be 'model', 'average' or a floating torch.dtype, got {dtype!r}"
        )
    if not isinstance(full, bool):
        raise TypeError(f"{owner}.averaged_state_dict: full must be a bool, got full={full!r}")
    values: dict[str, Any] = {}
    for name, view, group, i in storage.tensors(k):
        cast = group.source_dtype if dtype == "model" else (None if dtype == "average" else dtype)
        local = view if cast is None else view.to(cast)
        layout = group.layouts[i]
        values[name] = local if layout is None else layout.wrap(local)
    values.update(storage.copies)
    distributed.reshard(model)
    out: dict[str, Any] = {}
    for raw, value in model.state_dict().items():
        name = normalize_name(raw)
        primary = aliases.get(name, name)
        out[name] = values.get(primary, value)
    if not full:
        return out
    flat = storage.flat_names()
    full_sd = distributed.gather_full(out)
    for name, value in full_sd.items():
        shape = flat.get(aliases.get(name, name))
        if shape is not None:
            full_sd[name] = value.view(shape)
    return full_sd
