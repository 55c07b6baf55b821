"""The update's hot path: move every profile of every group toward a bound model.

Owns the per-update work and nothing else: no checks (the binding was validated by
:mod:`emakit._engine.binding`), no allocation (the storage planned every chunk and scratch), no
host synchronisation (except :func:`all_finite`, which runs only when the non-finite guard
is on). :func:`note_nonfinite` (``locate_nonfinite=True``) marks on the device the update
that made an average non-finite. Each group takes one of three paths:

- its sources form one flat array laid out like its buffer (``contiguous_parameters_``):
  one ``lerp_`` over the whole group, chunked when staged or when there are several profiles;
- large tensors: one fused ``lerp_`` over them, or chunked likewise;
- runs of small tensors: gathered with one ``torch.cat`` per run, one ``lerp_`` per profile.

Copied tensors (integer buffers) are then copied.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels
from .binding import Binding
from .storage import Storage


@torch.no_grad()
def apply_(storage: Storage, binding: Binding, coefficients: list[float]) -> None:
    """Move profile ``k`` by ``coefficients[k] = 1 - decay_k`` toward the bound model."""
    for g, group in enumerate(storage.groups):
        region = binding.regions[g]
        if region is not None:  # the sources are one flat array laid out like ours
            if group.region_chunks is None:
                kernels.lerp_([group.buffer[0]], [region], coefficients[0])
            else:
                chunks = group.region_chunks
                kernels.multi_lerp_(chunks.pieces, [region], chunks.batches, coefficients, chunks.scratch)
            continue
        if group.big:
            sources = binding.big[g]
            if group.chunks is None:
                kernels.lerp_(group.big_views, sources, coefficients[0])
            else:
                chunks = group.chunks
                kernels.multi_lerp_(chunks.pieces, sources, chunks.batches, coefficients, chunks.scratch)
        flat = binding.small_flat[g]
        for batch in group.gathers:
            kernels.gather_lerp_(
                batch.targets, flat[batch.first : batch.last], batch.gathered, batch.staged, coefficients
            )
    if binding.copies:
        for stored, (tbl, attr) in zip(storage.copies.values(), binding.copies):
            stored.copy_(tbl[attr])


@torch.no_grad()
def note_nonfinite(storage: Storage, marks: dict[torch.device, Tensor], update: int, t: float) -> None:
    """Record ``(update, t)`` in ``marks[device]`` if profile 0 of a group there became non-finite now.

    No host synchronisation: one sum over each group's first profile (NaN or Inf enters every
    profile at once, and stays), compared and stored on the device. ``marks[device]`` is a
    float64 pair, ``-1`` until the first non-finite update.
    """
    for group in storage.groups:
        mark = marks.get(group.device)
        if mark is None:
            mark = marks[group.device] = torch.full((2,), -1.0, dtype=torch.float64, device=group.device)
        fresh = torch.logical_and(~torch.isfinite(group.buffer[0].sum()), mark[0] < 0)
        mark.copy_(torch.stack([torch.where(fresh, float(update), mark[0]), torch.where(fresh, float(t), mark[1])]))


def all_finite(binding: Binding) -> bool:
    """Whether every averaged tensor of the bound model is finite: one host synchronisation per device."""
    norms: dict[torch.device, list[Tensor]] = {}
    for tensors in binding.locals:
        if tensors:
            norms.setdefault(tensors[0].device, []).extend(torch._foreach_norm(tensors, float("inf")))
    return all(bool(torch.isfinite(torch.stack([n.float() for n in ns])).all()) for ns in norms.values())
