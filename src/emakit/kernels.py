"""Stateless tensor kernels: move lists of averages toward lists of weights, in place.

The EMA update is memory-bound: its floor is one pass that reads the weights, reads the
average and writes the average. These functions reach it by

- one ``torch._foreach_lerp_`` call per group of same-dtype tensors (no per-tensor Python,
  no host synchronisation: the weight is a Python float);
- for weights in another dtype or on another device (a bf16 model with an fp32 average),
  staging each chunk of weights through a small scratch buffer that stays in cache, so no
  temporary the size of the model is ever allocated;
- for several averages of the same weights (power EMA profiles), reading each chunk of
  weights once from memory and once per further average from cache.

Pieces are the unit of work: a piece is either a whole tensor or a 1-D slice of a dense
tensor. :func:`plan_pieces` cuts a list of sizes into batches of pieces of at most
``chunk`` elements.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Piece",
    "chunk_numel",
    "flat_view",
    "gather_lerp_",
    "is_dense",
    "lerp_",
    "multi_lerp_",
    "plan_pieces",
]

#: Elements staged at once. 1 Mi fp32 elements (4 MiB) keeps the staged chunk in the
#: L2/L3 caches of a CPU; GPUs have no such cache to aim at and want fewer, larger launches.
_CHUNK = {"cpu": 1 << 20}
_CHUNK_DEFAULT = 1 << 24

#: Tensors up to this size are gathered into a scratch with ``torch.cat`` and updated as one
#: array: a fused ``foreach`` call still costs about a microsecond of dispatch per tensor on a
#: CPU, ``cat`` a third of that. Larger tensors are updated in place, where dispatch is noise.
SMALL_NUMEL = 1 << 16


def chunk_numel(device: torch.device) -> int:
    """Number of elements staged per chunk on ``device``."""
    return _CHUNK.get(device.type, _CHUNK_DEFAULT)


def is_dense(t: Tensor) -> bool:
    """Whether ``t`` covers one gap-free, non-overlapping span of its storage (any dim order)."""
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def flat_view(t: Tensor) -> Tensor:
    """1-D view of the elements of a dense tensor, in storage order."""
    if t.is_contiguous():
        return t.view(-1)
    if not is_dense(t):
        raise ValueError(f"flat_view: tensor of shape {tuple(t.shape)} and stride {t.stride()} is not dense")
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


class Piece(NamedTuple):
    """Elements ``[start, start + numel)`` of tensor ``index``; ``whole`` when that is all of it."""

    index: int
    start: int
    numel: int
    whole: bool


def plan_pieces(numels: Sequence[int], chunk: int) -> list[list[Piece]]:
    """Cut tensors of the given sizes into batches of pieces of at most ``chunk`` elements in all.

    A tensor that fits in a chunk stays whole (it is addressed as itself, with no slicing);
    a larger one is split into 1-D slices.

        >>> [[tuple(p) for p in b] for b in plan_pieces([3, 5], chunk=4)]
        [[(0, 0, 3, True), (1, 0, 1, False)], [(1, 1, 4, False)]]
    """
    if chunk < 1:
        raise ValueError(f"plan_pieces: chunk must be >= 1, got chunk={chunk}")
    batches: list[list[Piece]] = []
    batch: list[Piece] = []
    room = chunk
    for index, numel in enumerate(numels):
        if numel == 0:
            continue
        if numel <= chunk:
            if numel > room:
                batches.append(batch)
                batch, room = [], chunk
            batch.append(Piece(index, 0, numel, True))
            room -= numel
            continue
        start = 0
        while start < numel:
            if room == 0:
                batches.append(batch)
                batch, room = [], chunk
            n = min(room, numel - start)
            batch.append(Piece(index, start, n, False))
            room -= n
            start += n
    if batch:
        batches.append(batch)
    return batches


def _slice(tensors: Sequence[Tensor], flats: dict[int, Tensor], piece: Piece) -> Tensor:
    if piece.whole:
        return tensors[piece.index]
    flat = flats.get(piece.index)
    if flat is None:
        flat = flats[piece.index] = flat_view(tensors[piece.index])
    return flat[piece.start : piece.start + piece.numel]


def lerp_(averages: list[Tensor], weights: list[Tensor], weight: float) -> None:
    """``avg += weight * (w - avg)`` for every pair, in one fused call.

    Both lists hold tensors of equal shapes, dtypes and devices. ``weight = 1 - decay``.
    A weight of exactly 1 copies.
    """
    if not averages:
        return
    if weight == 1.0:
        torch._foreach_copy_(averages, weights)
    elif weight != 0.0:
        torch._foreach_lerp_(averages, weights, weight)


def multi_lerp_(
    averages: Sequence[Sequence[Sequence[Tensor]]],
    weights: Sequence[Tensor],
    batches: Sequence[Sequence[Piece]],
    coefficients: Sequence[float],
    scratch: Sequence[Sequence[Tensor]] | None = None,
) -> None:
    """Move ``K`` averages of the same weights toward them, chunk by chunk.

    ``averages[k][b]`` holds, for average ``k``, the pieces of batch ``b`` (laid out as
    ``batches[b]``); ``weights`` are the source tensors; ``coefficients[k] = 1 - decay_k``.
    With ``scratch`` (``scratch[b]``: tensors shaped like the pieces of batch ``b``, all
    views into one small buffer in the averages' dtype and device), each chunk of weights is
    first copied (converted) into the scratch, which then stays in cache for every average.
    Without it, the weights must already have the averages' dtype and device.
    """
    flats: dict[int, Tensor] = {}
    for b, batch in enumerate(batches):
        source = [_slice(weights, flats, p) for p in batch]
        if scratch is not None:
            staged = scratch[b]
            if staged[0].device == source[0].device:
                torch._foreach_copy_(staged, source)
            else:  # e.g. weights on an accelerator, averages in host memory
                for dst, src in zip(staged, source):
                    dst.copy_(src)
            source = staged
        for k, w in enumerate(coefficients):
            lerp_(list(averages[k][b]), source, w)


def gather_lerp_(
    targets: Sequence[Tensor],
    sources: Sequence[Tensor],
    gathered: Tensor,
    staged: Tensor | None,
    coefficients: Sequence[float],
) -> None:
    """Move ``K`` flat averages toward many small tensors at once.

    ``sources`` are 1-D tensors whose concatenation lines up with each of ``targets[k]``
    (1-D, contiguous). They are gathered into ``gathered`` (same dtype as the sources) with
    one ``torch.cat``, converted into ``staged`` when the averages have another dtype, then
    each average takes one ``lerp_`` from that cache-resident copy.
    """
    torch.cat(list(sources), out=gathered)
    if staged is not None:
        staged.copy_(gathered)
        gathered = staged
    for target, w in zip(targets, coefficients):
        lerp_([target], [gathered], w)
