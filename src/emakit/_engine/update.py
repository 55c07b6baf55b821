"""The update's hot path: move every profile of every group toward a bound model.

Owns the per-update work and nothing else: no checks (the binding was validated by
:mod:`emakit._engine.binding`), no allocation (the storage planned every chunk and scratch), no
host synchronisation (except :func:`all_finite`, which runs only when the non-finite guard
is on). With ``locate=True`` (``locate_nonfinite=True``) every chunk of profile 0 is also
read once more right after its ``lerp_``, while it is still in cache, and
:func:`note_nonfinite` marks the update that made an average non-finite (see there). Each group takes one of three paths:

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
from .storage import Chunks, Group, Storage, cut, joined


@torch.no_grad()
def apply_(
    storage: Storage, binding: Binding, coefficients: list[float], locate: bool = False
) -> dict[torch.device, list] | None:
    """Move profile ``k`` by ``coefficients[k] = 1 - decay_k`` toward the bound model.

    ``locate``: chunk every path, and return, per device, each chunk of profile 0 with a
    statistic taken right after its update, while in cache (see :func:`note_nonfinite`).
    """
    if locate:
        return _apply_located(storage, binding, coefficients)
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
    _copy(storage, binding)
    return None


def _copy(storage: Storage, binding: Binding) -> None:
    if binding.copies:
        for stored, (tbl, attr) in zip(storage.copies.values(), binding.copies):
            stored.copy_(tbl[attr])


def _apply_located(storage: Storage, binding: Binding, coefficients: list[float]) -> dict[torch.device, list]:
    """:func:`apply_` chunk by chunk, each chunk of profile 0 checked while it is in cache (:func:`_check`)."""
    found: dict[torch.device, list[tuple[Tensor, Tensor]]] = {}
    for g, group in enumerate(storage.groups):
        out = found.setdefault(group.device, [])
        region = binding.regions[g]
        if region is not None:
            chunks = group.region_chunks or group.locate_chunks.get("region")
            if chunks is None:
                chunks = cut([[group.buffer[0]]], [torch.Size([group.numel])], None, _chunk(group))
                group.locate_chunks["region"] = chunks
            _chunked(chunks, [region], coefficients, out)
            continue
        if group.big:
            chunks = group.chunks or group.locate_chunks.get("big")
            if chunks is None:
                chunks = cut([group.big_views], [group.shapes[i] for i in group.big], None, _chunk(group))
                group.locate_chunks["big"] = chunks
            _chunked(chunks, binding.big[g], coefficients, out)
        flat = binding.small_flat[g]
        for batch in group.gathers:
            kernels.gather_lerp_(
                batch.targets, flat[batch.first : batch.last], batch.gathered, batch.staged, coefficients
            )
            _check(batch.targets[0], out)
    _copy(storage, binding)
    return found


def _chunk(group: Group) -> int:
    return kernels.chunk_numel(group.device)


def _chunked(chunks: Chunks, sources: list[Tensor], coefficients: list[float], out: list) -> None:
    """Every batch of ``chunks``: updated (all profiles), then profile 0's pieces checked while in cache (those
    that lie back to back as one: an op per chunk, not per tensor)."""
    if chunks.spans is None:
        chunks.spans = [joined(pieces) for pieces in chunks.pieces[0]]
    for b, batch in enumerate(chunks.batches):
        pieces = [[chunks.pieces[k][b]] for k in range(len(coefficients))]
        scratch = None if chunks.scratch is None else [chunks.scratch[b]]
        kernels.multi_lerp_(pieces, sources, [batch], coefficients, scratch)
        for span in chunks.spans[b]:
            _check(span, out)


def _check(piece: Tensor, out: list[tuple[Tensor, Tensor]]) -> None:
    """Append ``(piece, statistic)``: on a CPU its sum (the fastest read; NaN or Inf in it makes the sum
    non-finite, and :func:`note_nonfinite` confirms a non-finite sum element by element, as a finite one can
    overflow), elsewhere its minimum and maximum (NaN propagates, nothing overflows: no confirmation needed,
    so no host synchronisation)."""
    if piece.numel():
        out.append((piece, piece.sum() if piece.device.type == "cpu" else torch.stack(torch.aminmax(piece))))


@torch.no_grad()
def note_nonfinite(marks: dict[torch.device, Tensor], found: dict[torch.device, list], update: int, t: float):
    """Record ``(update, t)`` in ``marks[device]`` if an average there became non-finite at this update.

    ``found``: per device, each chunk of profile 0 with its statistic (:func:`_check`), taken
    just after its update (NaN or Inf enters every profile at once, and stays). Accelerators:
    decided on the device from every chunk's minimum and maximum, without a host
    synchronisation. CPU: a chunk whose sum is not finite is confirmed by its minimum and
    maximum (a sum of finite values can overflow), until the first mark. ``marks[device]`` is
    a float64 pair, ``-1`` until the first non-finite update.
    """
    for device, checked in found.items():
        if not checked:
            continue
        mark = marks.get(device)
        if mark is None:
            mark = marks[device] = torch.full((2,), -1.0, dtype=torch.float64, device=device)
        if device.type == "cpu":
            if mark[0] >= 0 or bool(torch.isfinite(torch.stack([s for _, s in checked])).all()):
                continue
            suspects = [p for p, s in checked if not bool(torch.isfinite(s))]
            bad = torch.tensor(any(not bool(torch.isfinite(torch.stack(torch.aminmax(p))).all()) for p in suspects))
        else:
            bad = ~torch.isfinite(torch.cat([s for _, s in checked])).all()
        fresh = torch.logical_and(bad, mark[0] < 0)
        mark.copy_(torch.stack([torch.where(fresh, float(update), mark[0]), torch.where(fresh, float(t), mark[1])]))


def all_finite(binding: Binding) -> bool:
    """Whether every averaged tensor of the bound model is finite: one host synchronisation per device."""
    norms: dict[torch.device, list[Tensor]] = {}
    for tensors in binding.locals:
        if tensors:
            norms.setdefault(tensors[0].device, []).extend(torch._foreach_norm(tensors, float("inf")))
    return all(bool(torch.isfinite(torch.stack([n.float() for n in ns])).all()) for ns in norms.values())
