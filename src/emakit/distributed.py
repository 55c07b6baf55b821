"""Averages of sharded and replicated models: DDP, FSDP2 (DTensor), DeepSpeed ZeRO.

Everything that knows about process groups, DTensors and training engines lives here, so
the averaging code sees only *local* tensors: each rank averages the elements it owns, with
no communication per update. A tensor of the model is one of four kinds:

- ``local``: a plain tensor, averaged whole (single process, DDP, ZeRO-1/2);
- ``dtensor``: an FSDP2 / tensor-parallel DTensor; its local shard is averaged and the
  average is a DTensor with the parameter's mesh, placements, shape and stride;
- ``rows``: a replicated tensor (DDP) split across the ranks of a mesh when the average is
  built with ``shard=True``: each rank keeps the rows ``torch.chunk`` gives it along dim 0,
  the layout FSDP2 would use (``Shard(0)``), so the averages load into an FSDP2 run and back;
- ``zero3``: a DeepSpeed ZeRO-3 parameter; its local partition of the flattened parameter
  is averaged, and the average is a 1-D ``Shard(0)`` DTensor of ``numel`` elements.

Time is host-side (every rank holds the same ``t``), so decays need no communication either.
DCP checkpoint files are :mod:`emakit._files.dcp`; reading snapshot shards for a distributed
reconstruction is :mod:`emakit._posthoc.shard_reader`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Layout", "reshard"]


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(t: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    return isinstance(t, _dtensor_type())


def is_zero3(t: Tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter (its data lives in ``ds_tensor``, partitioned)."""
    return hasattr(t, "ds_tensor") and hasattr(t, "ds_numel")


@dataclass(frozen=True)
class Layout:
    """Where a rank's local average sits in the global tensor: enough to build the DTensor."""

    mesh: Any  # DeviceMesh
    placements: tuple
    shape: torch.Size  # global shape of the stored tensor
    stride: tuple[int, ...]
    model_shape: torch.Size  # the parameter's shape (differs from ``shape`` for flattened ZeRO-3)

    def wrap(self, local: Tensor) -> Tensor:
        """``local`` as a DTensor with this layout (shares memory, no communication)."""
        return _dtensor_type().from_local(
            local, self.mesh, self.placements, run_check=False, shape=self.shape, stride=self.stride
        )

    def local_of(self, value: Tensor) -> Tensor:
        """This rank's part of ``value``: a DTensor (any layout, redistributed if needed) or a full tensor."""
        DTensor = _dtensor_type()
        if isinstance(value, DTensor):
            if value.device_mesh == self.mesh and tuple(value.placements) == self.placements:
                return value.to_local()
            if value.device_mesh == self.mesh:
                return value.redistribute(self.mesh, self.placements).to_local()
            value = value.full_tensor()
        if value.shape != self.shape:
            value = value.reshape(self.shape)  # a model-shaped tensor for a flattened ZeRO-3 average
        from torch.distributed.tensor import distribute_tensor

        # src_data_rank=None: every rank holds the full value; each slices its part, no communication.
        return distribute_tensor(value, self.mesh, self.placements, src_data_rank=None).to_local()


# --------------------------------------------------------------------------- engines


def check_model(owner: str, model: nn.Module) -> None:
    """Refuse wrappers whose parameters cannot be averaged shard-locally (FSDP1's flat parameters)."""
    if not torch.distributed.is_available():
        return
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - builds without FSDP
        return
    for name, module in model.named_modules():
        if isinstance(module, FullyShardedDataParallel):
            raise TypeError(
                f"{owner}: the model is wrapped in FSDP1 (FullyShardedDataParallel at {name or 'the root'!r}), "
                f"whose flat parameters mix many tensors and change layout between steps; emakit supports "
                f"FSDP2: torch.distributed.fsdp.fully_shard(module), see docs/distributed.md"
            )


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module of ``model`` back into its sharded state.

    After a forward pass under ``torch.no_grad()`` the root module keeps its parameters
    unsharded (full, plain tensors) until the next backward; the averages pair with the
    sharded ones, and a swap must not leave stale unsharded weights behind.
    """
    if not torch.distributed.is_available():
        return
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def default_mesh(owner: str, shard: Any):
    """The 1-D mesh that ``shard=`` asks to split replicated tensors across, or None."""
    if shard is False or shard is None:
        return None
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(shard, DeviceMesh):
        if shard.ndim != 1:
            raise ValueError(f"{owner}: shard must be True or a 1-D DeviceMesh, got a {shard.ndim}-D mesh")
        return shard
    if shard is not True:
        raise TypeError(f"{owner}: shard must be False, True or a 1-D DeviceMesh, got shard={shard!r}")
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(
            f"{owner}: shard=True splits the average across the ranks of the default process group, "
            f"but torch.distributed is not initialised; call torch.distributed.init_process_group() first"
        )
    return _world_mesh()


_MESHES: dict[tuple, Any] = {}


def _world_mesh(group=None):
    """A 1-D mesh over ``group`` (default: the world), on the backend's device type."""
    from torch.distributed.device_mesh import DeviceMesh

    dist = torch.distributed
    group = group or dist.group.WORLD
    backend = str(dist.get_backend(group))
    device_type = "cpu" if backend == "gloo" else (torch.accelerator.current_accelerator() or torch.device("cpu")).type
    key = (id(group), device_type)
    if key not in _MESHES:
        _MESHES[key] = DeviceMesh.from_group(group, device_type)
    return _MESHES[key]


# --------------------------------------------------------------------------- per-tensor kinds


def classify(t: Tensor, rows_mesh) -> tuple[str, Layout | None, Tensor]:
    """``(kind, layout, local)`` for a model tensor: what this rank averages, and where it sits."""
    if is_dtensor(t):
        layout = Layout(t.device_mesh, tuple(t.placements), t.shape, tuple(t.stride()), t.shape)
        return "dtensor", layout, _local_dtensor(t)
    if is_zero3(t):
        return _zero3(t)
    if rows_mesh is not None:
        layout = _rows_layout(t, rows_mesh)
        return "rows", layout, _rows(t, layout)
    return "local", None, t.detach()


def model_shape(t: Tensor, kind: str) -> torch.Size:
    """The parameter's shape as the model sees it (a ZeRO-3 parameter's own ``shape`` is empty)."""
    return torch.Size(t.ds_shape) if kind == "zero3" else t.shape


def _local_dtensor(t: Tensor) -> Tensor:
    with torch.no_grad():
        return t.to_local().detach()


def _rows_layout(t: Tensor, mesh) -> Layout:
    from torch.distributed.tensor import Replicate, Shard

    placement = (Shard(0),) if t.dim() > 0 else (Replicate(),)
    return Layout(mesh, placement, t.shape, tuple(t.stride()), t.shape)


def _row_range(rows: int, mesh) -> tuple[int, int]:
    n = mesh.size()
    chunk = math.ceil(rows / n) if rows else 0
    start = min(mesh.get_local_rank() * chunk, rows)
    return start, min(start + chunk, rows)


def _rows(t: Tensor, layout: Layout) -> Tensor:
    if t.dim() == 0:
        return t.detach()
    start, stop = _row_range(t.shape[0], layout.mesh)
    return t.detach().narrow(0, start, stop - start)


def _zero3_mesh(t: Tensor):
    group = getattr(t, "ds_process_group", None)
    return _world_mesh(group)


def _zero3(t: Tensor) -> tuple[str, Layout, Tensor]:
    from torch.distributed.tensor import Shard

    mesh = _zero3_mesh(t)
    numel = int(t.ds_numel)
    part = t.ds_tensor
    start = min(mesh.get_local_rank() * part.numel(), numel)
    valid = min(part.numel(), numel - start)
    # DeepSpeed pads every partition to ceil(numel / ranks); torch.chunk gives the same split.
    if math.ceil(numel / mesh.size()) != part.numel():
        raise NotImplementedError(
            f"DeepSpeed ZeRO-3 partition of {part.numel()} elements for a parameter of {numel} over "
            f"{mesh.size()} ranks: emakit expects ceil(numel / ranks) per rank"
        )
    layout = Layout(mesh, (Shard(0),), torch.Size([numel]), (1,), torch.Size(t.ds_shape))
    return "zero3", layout, part.detach().view(-1).narrow(0, 0, valid)


def _ptr_local(t: Tensor) -> int:
    return t.data_ptr()


def _ptr_dtensor(t: Tensor) -> int:
    # ``_local_tensor`` is what ``to_local()`` returns outside autograd, at 1/60th of the cost.
    return t._local_tensor.data_ptr()


def _ptr_zero3(t: Tensor) -> int:
    return t.ds_tensor.data_ptr()


#: Per kind: the data pointer that changes when the model's storage for a tensor is re-allocated.
POINTER: dict[str, Callable[[Tensor], int]] = {
    "local": _ptr_local,
    "rows": _ptr_local,
    "dtensor": _ptr_dtensor,
    "zero3": _ptr_zero3,
}


def swap_targets(kind: str, t: Tensor, local: Tensor, layout: Layout | None) -> list[tuple[Tensor, bool]]:
    """The model memory a swap overwrites, each with whether it takes the full (gathered) average.

    The local part for ``local`` / ``dtensor`` / ``zero3``; the whole replica for ``rows``; for
    ZeRO-3 parameters that are currently gathered (DeepSpeed keeps small "persistent" ones
    gathered between steps) also the gathered copy, which the next forward would use as is.
    """
    if kind == "rows":
        return [(t.detach(), layout.placements[0].is_shard())]
    targets = [(local, False)]
    if kind == "zero3" and t.numel() == layout.shape.numel() and t.numel() > 0:
        targets.append((t.detach(), True))
    return targets


def swap_value(view: Tensor, layout: Layout | None, full: bool) -> Tensor:
    """What a swap writes: the local view, or the gathered full average (collective)."""
    if not full:
        return view
    return layout.wrap(view).full_tensor().view(layout.model_shape)


# --------------------------------------------------------------------------- gathering


def gather_full(values: dict[str, Any]) -> dict[str, Tensor]:
    """Full CPU tensors on rank 0 ({} elsewhere), one tensor at a time, from a dict with DTensors.

    Collective: every rank must call it with the same keys. No rank ever holds more than
    one full tensor besides rank 0's result.
    """
    DTensor = _dtensor_type() if torch.distributed.is_available() else ()
    dist = torch.distributed
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    out: dict[str, Tensor] = {}
    for name, value in values.items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if rank == 0:
            out[name] = value.detach().to("cpu", copy=True)
        del value
    return out


# --------------------------------------------------------------------------- process group


def dist_ready() -> bool:
    """Whether a default process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if dist_ready() else 0


def world_size() -> int:
    """Ranks in the default process group (1 without one)."""
    return torch.distributed.get_world_size() if dist_ready() else 1


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, by rank (collective; ``[obj]`` without a process group). For small objects."""
    if not dist_ready():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank: collective (one all-reduce); ``flag`` itself without a process group."""
    if not dist_ready():
        return flag
    dist = torch.distributed
    device = "cpu" if str(dist.get_backend()) == "gloo" else torch.accelerator.current_accelerator() or "cpu"
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier() -> None:
    if dist_ready():
        torch.distributed.barrier()
