"""Where the averages live: which tensors are averaged, and the flat buffers that hold them.

Owns the decision, made once at construction, of what is averaged, copied or left in the
model (:func:`plan`), and the storage (:class:`Storage`): one flat ``(K, numel)`` buffer
per group of tensors that share (kind, source dtype/device, average dtype/device), a view
per name and profile, the plan that cuts each group into cache-sized chunks for the update
kernels, and one scratch buffer per (dtype, device) shared by the groups.

It reads the model's tensors only at construction (their initial values, shapes and
layouts). It never keeps a reference to the model, never reads time or schedules, and never
touches files: binding to a model is :mod:`emakit._engine.binding`, the update is
:mod:`emakit._engine.update`, checkpoints are :mod:`emakit._engine.checkpoint`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import distributed, kernels
from .model import Slot, default_average_dtype, is_float

BUFFER_MODES = ("average", "copy")


# --------------------------------------------------------------------------- what is averaged


@dataclass
class Spec:
    """What goes where, decided once at construction (normalised names)."""

    average: list[str] = field(default_factory=list)
    copy: list[str] = field(default_factory=list)
    live: list[str] = field(default_factory=list)  # read from the model when needed (frozen, excluded)
    frozen: list[str] = field(default_factory=list)  # the live floating parameters ``include`` accepts:
    # averaged from the moment they become trainable (see _Averager._promote)


def plan(
    owner: str, slots: dict[str, Slot], include: Callable[[str], bool] | None, buffers: str
) -> tuple[Spec, dict[str, Tensor]]:
    """Sort the model's tensors into averaged, copied and live ones; returns ``(spec, tensors)``.

    Trainable floating parameters are averaged; floating buffers too unless ``buffers="copy"``;
    integer and bool buffers are copied; frozen parameters and tensors ``include`` rejects
    stay in the model (frozen floating parameters are listed in ``spec.frozen`` too: they are
    averaged once they become trainable).
    """
    spec = Spec()
    tensors: dict[str, Tensor] = {}
    for name, slot in slots.items():
        t = tensors[name] = slot.get()
        included = include is None or bool(include(name))
        if slot.is_param:
            kind = "average" if (included and t.requires_grad and is_float(t)) else "live"
            if kind == "live" and included and is_float(t):
                spec.frozen.append(name)
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
    return spec, tensors


# --------------------------------------------------------------------------- groups and chunks


@dataclass
class Chunks:
    """How tensors are cut into chunks: pieces per batch, for every profile and the scratch."""

    batches: list[list[kernels.Piece]]
    pieces: list[list[list[Tensor]]]  # [profile][batch] -> tensors
    scratch: list[list[Tensor]] | None  # [batch] -> staging tensors, or None when not staged
    spans: list[list[Tensor]] | None = None  # [batch] -> profile 0's pieces, adjacent ones joined (:func:`joined`)


def joined(pieces: list[Tensor]) -> list[Tensor]:
    """``pieces`` with each run of them that lies back to back in one storage as one 1-D view: what a reduction
    over them all reads in one op (the pieces of a chunk usually lie so in a group's flat buffer)."""
    out: list[Tensor] = []
    end = None  # (storage pointer, dtype, offset just past the last dense piece of ``out``)
    for piece in pieces:
        if not piece.numel():
            continue
        dense = kernels.is_dense(piece)
        here = (piece.untyped_storage().data_ptr(), piece.dtype, piece.storage_offset())
        if dense and end is not None and here == end:
            last = out[-1]
            out[-1] = last.as_strided((last.numel() + piece.numel(),), (1,), last.storage_offset())
        else:
            out.append(kernels.flat_view(piece) if dense else piece)
        end = (here[0], here[1], here[2] + piece.numel()) if dense else None
    return out


def cut(targets: list[list[Tensor]], shapes: list[torch.Size], scratch: Tensor | None, chunk: int) -> Chunks:
    """Chunks for tensors whose per-profile targets are ``targets[k][i]`` (dense, shaped ``shapes[i]``)."""
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
    return Chunks(batches, pieces, staged)


@dataclass
class Gather:
    """One batch of consecutive small tensors: ``small[first:last]`` of the group."""

    first: int
    last: int
    targets: list[Tensor]  # per profile: the batch's contiguous slice of the buffer
    gathered: Tensor  # scratch slice in the source dtype
    staged: Tensor | None  # scratch slice in the average's dtype, when they differ


@dataclass
class Group:
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
    # Large tensors: one fused call over whole tensors, or chunked (``chunks``) when staged or K > 1.
    big: list[int] = field(default_factory=list)
    big_views: list[Tensor] = field(default_factory=list)  # profile 0's views of those tensors
    chunks: Chunks | None = None
    # Runs of consecutive small tensors: gathered into a scratch with one ``torch.cat`` per
    # batch, then one ``lerp_`` per average on the matching contiguous slice of ``buffer``.
    small: list[int] = field(default_factory=list)
    gathers: list[Gather] = field(default_factory=list)
    region_chunks: Chunks | None = None  # one flat source region (see Storage.use_region), built on first need
    # One profile, unstaged: cut only for locate_nonfinite, on first need ("region" / "big" path).
    locate_chunks: dict[str, Chunks] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return self.buffer.shape[1]


# --------------------------------------------------------------------------- the storage


#: Where an average lives: ``placement(name, model tensor, local part) -> (dtype, device)``.
Placement = Callable[[str, Tensor, Tensor], tuple[torch.dtype, torch.device]]


def default_placement(dtype: torch.dtype | None, device: torch.device | None) -> Placement:
    """``dtype`` (default: fp32 for half-precision weights, else theirs) on ``device`` (default: the weights')."""
    return lambda name, t, local: (dtype or default_average_dtype(t.dtype), device or local.device)


class Storage:
    """``K`` averages of the tensors ``spec.average`` names, and copies of ``spec.copy``.

    Averages are grouped and stored flat (see :class:`Group`); copies are plain tensors by
    name. Everything is allocated here, at construction or by :meth:`add`; the update
    allocates nothing.
    """

    def __init__(
        self,
        owner: str,
        spec: Spec,
        tensors: dict[str, Tensor],
        is_param: Callable[[str], bool],
        num_profiles: int,
        *,
        placement: Placement,
        copies_device: Callable[[str, Tensor], torch.device],
        rows_mesh,
    ) -> None:
        self.owner = owner
        self.num_profiles = num_profiles
        self.groups: list[Group] = []
        self._scratch: dict[tuple, Tensor] = {}
        self._rows_mesh = rows_mesh
        self.add(spec.average, tensors, is_param, placement)
        with torch.no_grad():
            #: Copied (not averaged) tensors by name: integer buffers, float buffers with buffers="copy".
            self.copies: dict[str, Tensor] = {
                name: tensors[name].detach().to(copies_device(name, tensors[name]), copy=True) for name in spec.copy
            }

    def add(
        self, names: list[str], tensors: dict[str, Tensor], is_param: Callable[[str], bool], placement: Placement
    ) -> None:
        """Average ``names`` too, every profile starting at the tensor's current value (new groups)."""
        grouped: dict[tuple, list[str]] = {}
        local: dict[str, Tensor] = {}
        layouts: dict[str, distributed.Layout | None] = {}
        for name in names:
            t = tensors[name]
            kind, layouts[name], local[name] = distributed.classify(t, self._rows_mesh)
            avg_dtype, avg_device = placement(name, t, local[name])
            key = (kind, is_param(name), t.dtype, local[name].device, avg_dtype, avg_device)
            grouped.setdefault(key, []).append(name)
        with torch.no_grad():
            for key, group_names in grouped.items():
                self.groups.append(self._make_group(key, group_names, local, [layouts[n] for n in group_names]))

    # ------------------------------------------------------------------ building

    def _make_group(
        self, key: tuple, names: list[str], tensors: dict[str, Tensor], layouts: list[distributed.Layout | None]
    ) -> Group:
        kind, is_param, src_dtype, src_device, dtype, device = key
        k = self.num_profiles
        shapes, strides, offsets = [], [], []
        total = 0
        for name in names:
            t = tensors[name]
            if not kernels.is_dense(t):
                raise ValueError(
                    f"{self.owner}: tensor {name!r} (shape {tuple(t.shape)}, stride {t.stride()}) "
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
        group = Group(
            kind, is_param, src_dtype, src_device, dtype, device, names, layouts, shapes, strides, offsets, buffer,
            views, staged,
        )
        self._plan_update(group)
        return group

    def _plan_update(self, group: Group) -> None:
        """Sort a group's tensors into large ones (fused or chunked) and runs of small ones (gathered)."""
        k, shapes, offsets = self.num_profiles, group.shapes, group.offsets
        chunk = kernels.chunk_numel(group.device)
        # Small tensors are gathered with torch.cat, which needs sources on the average's device.
        small_ok = group.source_device == group.device
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
            gathered = self.scratch_for(group.source_dtype, group.device, numel)[:numel]
            staged_view = self.scratch_for(group.dtype, group.device, numel)[:numel] if group.staged else None
            targets = [group.buffer[j, start : start + numel] for j in range(k)]
            group.gathers.append(Gather(first, len(group.small), targets, gathered, staged_view))
        group.big_views = [group.views[0][i] for i in group.big]
        if group.big and (group.staged or k > 1):
            big_views = [[group.views[j][i] for i in group.big] for j in range(k)]
            need = min(chunk, sum(shapes[i].numel() for i in group.big))
            scratch = self.scratch_for(group.dtype, group.device, need) if group.staged else None
            group.chunks = cut(big_views, [shapes[i] for i in group.big], scratch, chunk)

    def scratch_for(self, dtype: torch.dtype, device: torch.device, numel: int) -> Tensor:
        """A scratch buffer of at least ``numel`` elements, shared by the groups (they run one by one).

        Growing it leaves earlier slices on the old buffer, which stays alive through them.
        """
        key = (dtype, device)
        have = self._scratch.get(key)
        if have is None or have.numel() < numel:
            self._scratch[key] = have = torch.empty(numel, dtype=dtype, device=device)
        return have

    def use_region(self, group: Group) -> None:
        """Prepare ``group`` for sources that form one flat array laid out like its buffer.

        With one profile and no staging that is a single ``lerp_``; otherwise the buffer is cut
        into chunks, planned here once, on first need.
        """
        if group.region_chunks is None and (group.staged or self.num_profiles > 1):
            chunk = kernels.chunk_numel(group.device)
            scratch = self.scratch_for(group.dtype, group.device, min(chunk, group.numel)) if group.staged else None
            group.region_chunks = cut(
                [[group.buffer[j]] for j in range(self.num_profiles)], [torch.Size([group.numel])], scratch, chunk
            )

    # ------------------------------------------------------------------ reading

    @property
    def numel(self) -> int:
        """Elements per profile, over all groups."""
        return sum(g.numel for g in self.groups)

    @property
    def is_sharded(self) -> bool:
        return any(g.kind != "local" for g in self.groups)

    def dtypes(self) -> str:
        """The averages' dtypes, as stored in checkpoints' settings."""
        return ",".join(sorted({str(g.dtype) for g in self.groups}))

    def tensors(self, k: int) -> Iterator[tuple[str, Tensor, Group, int]]:
        """Profile ``k``'s averages as stored: this rank's local parts, ``(name, view, group, index)``."""
        for group in self.groups:
            for i, name in enumerate(group.names):
                yield name, group.views[k][i], group, i

    def state_tensors(self, k: int) -> dict[str, Tensor]:
        """Profile ``k``'s averages with their global layout: DTensors where sharded (sharing memory)."""
        out = {}
        for name, view, group, i in self.tensors(k):
            layout = group.layouts[i]
            out[name] = view if layout is None else layout.wrap(view)
        return out

    def first_nonfinite(self) -> str | None:
        """The name of the first average holding NaN or Inf, or None; one host sync per device.

        A sum is NaN or Inf when any element is (one read, no temporary); a huge but finite
        sum can overflow, so a non-finite sum is confirmed tensor by tensor.
        """
        sums: dict[torch.device, list[Tensor]] = {}
        for group in self.groups:
            sums.setdefault(group.device, []).append(group.buffer.sum())
        if all(bool(torch.isfinite(torch.stack(ss)).all()) for ss in sums.values()):
            return None
        for k in range(self.num_profiles):
            for name, view, _, _ in self.tensors(k):
                if not bool(view.isfinite().all()):
                    return name
        return None  # only a sum overflowed

    def model_shapes(self) -> dict[str, torch.Size]:
        """The model's shape of every averaged tensor."""
        return {
            n: (lay.model_shape if lay is not None else shape)
            for g in self.groups
            for n, lay, shape in zip(g.names, g.layouts, g.shapes)
        }

    def flat_names(self) -> dict[str, torch.Size]:
        """Averages stored flattened (DeepSpeed ZeRO-3), with the model's shape for each."""
        return {
            n: lay.model_shape
            for g in self.groups
            for n, lay in zip(g.names, g.layouts)
            if lay is not None and lay.shape != lay.model_shape
        }


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))
