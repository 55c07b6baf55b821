"""The averager: ``K`` averages of a model's weights, orchestrating the modules that do the work.

An ``_Averager`` checks its arguments, decides what is averaged (:mod:`emakit._storage`),
allocates the storage, binds models to it (:mod:`emakit._binding`), moves time and runs the
update (:mod:`emakit._time`, :mod:`emakit._update`), puts the averages to use
(:mod:`emakit._swap`) and saves and loads itself (:mod:`emakit._checkpoint`). It knows
nothing about schedules beyond calling them: the public classes (``EMA``, ``PowerEMA``)
supply them and name what users see.

One ``update()``: :meth:`_Averager._advance` takes the next ``(t, dt)`` and each profile's
decay (``_time``), gets the model's binding, re-checked by data pointers (``_binding``), and
hands the coefficients ``1 - decay`` to ``_update.apply_``, which runs the kernels group by
group on the storage's precomputed views.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from . import _swap, _update, distributed
from ._binding import Binder, Binding
from ._checkpoint import Checkpointing
from ._model import model_slots
from ._storage import BUFFER_MODES, Group, Storage, plan
from ._time import check_decay, next_time


class _Averager(Checkpointing):
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
        if not isinstance(model, nn.Module):
            raise TypeError(f"{owner}: model must be a torch.nn.Module, got {type(model).__name__}")
        if buffers not in BUFFER_MODES:
            raise ValueError(f"{owner}: buffers must be one of {BUFFER_MODES}, got buffers={buffers!r}")
        if include is not None and not callable(include):
            raise TypeError(f"{owner}: include must be a callable name -> bool, got {include!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"{owner}: dtype must be a floating torch.dtype or None, got dtype={dtype!r}")
        distributed.check_model(owner, model)
        rows_mesh = distributed.default_mesh(owner, shard)
        self._owner = owner
        self._model = model
        self._buffers_mode = buffers
        self._device = torch.device(device) if device is not None else None
        self._swapped = False

        distributed.reshard(model)  # FSDP2: the sharded parameters are the ones registered
        self._slots, self._aliases = model_slots(model)
        self._spec, tensors = plan(owner, self._slots, include, buffers)
        self._storage = Storage(
            owner,
            self._spec,
            tensors,
            lambda name: self._slots[name].is_param,
            len(schedules),
            dtype=dtype,
            device=self._device,
            rows_mesh=rows_mesh,
        )
        self._binder = Binder(owner, self._storage, self._slots, rows_mesh)
        self._num_profiles = len(schedules)
        self._schedules = list(schedules)
        self.skip_nonfinite = bool(skip_nonfinite)
        #: Time of the last update, in the caller's unit (0 at construction).
        self.t: float = 0
        #: Updates applied, and updates skipped because the model held NaN/Inf.
        self.num_updates = 0
        self.num_skipped = 0

    # ------------------------------------------------------------------ the update

    def _advance(self, model: nn.Module | None, t: float | None, dt: float | None) -> list[float]:
        """One update: checks everything, then moves every profile; returns the decays."""
        self._assert_not_swapped("update")
        new_t, step = next_time(self._owner, self.t, t, dt)
        decays = [check_decay(self._owner, s, new_t, step) for s in self._schedules]
        binding = self._binder.fresh(self._model if model is None else model)
        if self.skip_nonfinite and not _update.all_finite(binding):
            warnings.warn(
                f"{self._owner}: skipped the update at t={new_t}: the model holds NaN or Inf; the averages are "
                f"unchanged and time moves on",
                RuntimeWarning,
                stacklevel=3,
            )
            self.num_skipped += 1
        else:
            _update.apply_(self._storage, binding, [1.0 - d for d in decays])
            self.num_updates += 1
        self.t = new_t
        return decays

    def _assert_not_swapped(self, what: str) -> None:
        if self._swapped:
            raise RuntimeError(
                f"{self._owner}.{what}() called inside swapped(): the model holds the averaged "
                f"weights there; leave the with-block first"
            )

    # ------------------------------------------------------------------ views for subclasses and tests

    @property
    def _groups(self) -> list[Group]:
        return self._storage.groups

    @property
    def _copies(self) -> dict[str, Tensor]:
        return self._storage.copies

    def _bind(self, model: nn.Module | None) -> Binding:
        return self._binder.bind(self._model if model is None else model)

    @property
    def is_sharded(self) -> bool:
        """Whether some average is split across ranks (FSDP2, ZeRO-3, or ``shard=True``)."""
        return self._storage.is_sharded

    # ------------------------------------------------------------------ using the averages

    def _averaged_state_dict(self, k: int, dtype: str, full: bool = False) -> dict[str, Tensor]:
        return _swap.averaged_state_dict(self._owner, self._storage, self._model, self._aliases, k, dtype, full)

    def _copy_to(self, model: nn.Module | None, k: int) -> None:
        self._assert_not_swapped("copy_to")
        _swap.copy_into(self._storage, self._binder.make(self._model if model is None else model), k)

    @contextlib.contextmanager
    def _swap(self, model: nn.Module | None, k: int, backup_device: torch.device | str | None) -> Iterator[None]:
        self._assert_not_swapped("swapped")
        target = self._model if model is None else model
        binding = self._binder.fresh(target)
        with _swap.swapped(self._storage, binding, target, k, backup_device):
            self._swapped = True
            try:
                yield
            finally:
                self._swapped = False
