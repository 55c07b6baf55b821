"""The averager: ``K`` averages of a model's weights, orchestrating the modules that do the work.

An ``_Averager`` checks its arguments, decides what is averaged (:mod:`emakit._engine.storage`),
allocates the storage, binds models to it (:mod:`emakit._engine.binding`), moves time and runs the
update (:mod:`emakit._engine.clock`, :mod:`emakit._engine.update`), puts the averages to use
(:mod:`emakit._engine.swap`) and saves and loads itself (:mod:`emakit._engine.checkpoint`). It knows
nothing about schedules beyond calling them: the public classes (``EMA``, ``PowerEMA``)
supply them and name what users see.

One ``update()``: :meth:`_Averager._advance` takes the next ``(t, dt)`` and each profile's
decay (``_time``), gets the model's binding, re-checked by data pointers (``_binding``), and
hands the coefficients ``1 - decay`` to ``_update.apply_``, which runs the kernels group by
group on the storage's precomputed views.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from .. import distributed
from . import module_view as _module_view
from . import swap as _swap
from . import update as _update
from .binding import Binder, Binding
from .checkpoint import Checkpointing
from .clock import check_decay, next_time
from .frozen import FrozenParameters
from .model import model_slots
from .nonfinite import NonFiniteChecks
from .options import Options
from .storage import Group, Storage, default_placement, plan


class _Averager(Checkpointing, FrozenParameters, NonFiniteChecks):
    """``K`` averages of a model's tensors. Subclasses supply the update coefficients."""

    #: ``state_dict()["format"]`` of the subclass.
    _format = "emakit.averager"

    def __init__(self, model: nn.Module, schedules: list[Callable[[float, float], float]], options: Options) -> None:
        owner = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{owner}: model must be a torch.nn.Module, got {type(model).__name__}")
        distributed.check_model(owner, model)
        rows_mesh = distributed.default_mesh(owner, options.shard)
        self._owner = owner
        self._model = model
        self._buffers_mode = options.buffers
        self._dtype = options.dtype
        self._device = torch.device(options.device) if options.device is not None else None
        self._rows_mesh = rows_mesh
        self._swapped = False

        distributed.reshard(model)  # FSDP2: the sharded parameters are the ones registered
        self._slots, self._aliases = model_slots(model)
        self._spec, tensors = plan(owner, self._slots, options.include, options.buffers)
        self._num_profiles = len(schedules)
        self._set_storage(
            Storage(
                owner,
                self._spec,
                tensors,
                self._is_param,
                self._num_profiles,
                placement=default_placement(self._dtype, self._device),
                copies_device=lambda name, t: self._device or t.device,
                rows_mesh=rows_mesh,
            )
        )
        self._schedules = list(schedules)
        self.skip_nonfinite = bool(options.skip_nonfinite)
        #: Mark on the device, per update, the first update that made an average non-finite.
        self.locate_nonfinite = bool(options.locate_nonfinite)
        self._nonfinite_marks: dict[torch.device, Tensor] = {}
        #: Time of the last update, in the caller's unit (0 at construction).
        self.t: float = 0
        #: Updates applied, and updates skipped because the model held NaN/Inf.
        self.num_updates = 0
        self.num_skipped = 0
        self._last_decays: list[float] | None = None  # what the last update() returned (public: ``decay``)

    def _is_param(self, name: str) -> bool:
        return self._slots[name].is_param

    def _set_storage(self, storage: Storage) -> None:
        self._storage = storage
        self._binder = Binder(self._owner, storage, self._slots, self._rows_mesh)
        views = getattr(self, "_views", None)
        self._views: weakref.WeakKeyDictionary[nn.Module, int] = (
            views if views is not None else weakref.WeakKeyDictionary()
        )
        for view, k in list(self._views.items()):
            _module_view.refill(view, storage, k, self._aliases)  # module views stay current
        # Frozen parameters: averaged from the moment they are trainable (see _watch_frozen).
        self._frozen = [(n, self._slots[n].table, self._slots[n].attr) for n in self._spec.frozen]
        self._watch_frozen()

    # ------------------------------------------------------------------ the update

    def _advance(self, model: nn.Module | None, t: float | None, dt: float | None) -> list[float]:
        """One update: checks everything, then moves every profile; returns the decays."""
        self._assert_not_swapped("update")
        new_t, step = next_time(self._owner, self.t, t, dt)
        decays = [check_decay(self._owner, s, new_t, step) for s in self._schedules]
        if self._frozen and not self._checked_frozen:
            self._promote_unfrozen()  # no optimizer step ran since the last update (see _watch_frozen)
        self._checked_frozen = False
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
            found = _update.apply_(self._storage, binding, [1.0 - d for d in decays], locate=self.locate_nonfinite)
            self.num_updates += 1
            if found is not None:  # locate_nonfinite: each chunk checked in cache, marked on the device
                _update.note_nonfinite(self._nonfinite_marks, found, self.num_updates, new_t)
        self.t = new_t
        self._last_decays = decays
        return decays

    def reset(self, model: nn.Module | None = None) -> None:
        """Start over: every average becomes a copy of the model's current tensors, and ``t = 0``.

        As at construction: ``t``, ``num_updates``, ``num_skipped`` return to 0 and ``decay``
        to None; the settings (schedule, dtype, device) are kept. ``model`` may be another view
        of the model (DDP, ``torch.compile``), default the one given at construction. For
        "restart the average from the weights as they are now" (k-diffusion's
        ``--reset-ema``, a fine-tuning phase); nothing changes when it raises.
        """
        self._assert_not_swapped("reset")
        binding = self._binder.fresh(self._model if model is None else model)
        _swap.copy_from(self._storage, binding)
        self.t = 0
        self.num_updates = self.num_skipped = 0
        self._last_decays = None
        self._nonfinite_marks.clear()

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """Move or cast the averages (and copied tensors), like ``nn.Module.to``; returns ``self``.

        ``device=None`` keeps each average where it is, ``dtype=None`` keeps its precision. The
        averages are also planned again against the model as it is now: after ``model.to(...)``
        or ``accelerator.prepare(model)``, ``ema.to(device)`` moves them along, and ``ema.to()``
        keeps them where they are and reads the moved weights from there. Values are copied
        exactly (cast only when ``dtype`` asks). Holds the old and the new averages at once
        while copying. Nothing changes when it raises (e.g. a model sharded differently).
        """
        self._assert_not_swapped("to")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"{self._owner}.to: dtype must be a floating torch.dtype or None, got dtype={dtype!r}")
        device = torch.device(device) if device is not None else None
        old = self._storage
        where = {name: (view.dtype, view.device) for name, view, _, _ in old.tensors(0)}
        distributed.reshard(self._model)
        tensors = {n: self._slots[n].get() for n in (*self._spec.average, *self._spec.copy)}
        new = Storage(
            self._owner,
            self._spec,
            tensors,
            self._is_param,
            self._num_profiles,
            placement=lambda name, t, local: (dtype or where[name][0], device or where[name][1]),
            copies_device=lambda name, t: device or old.copies[name].device,
            rows_mesh=self._rows_mesh,
        )
        _copy_storage(self._owner, old, new)
        self._set_storage(new)
        self._dtype = dtype or self._dtype
        self._device = device or self._device
        return self

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

    def _averaged_state_dict(self, k: int, dtype: str | torch.dtype, full: bool = False) -> dict[str, Tensor]:
        self._check_finite("averaged_state_dict", collective=full is True)
        return _swap.averaged_state_dict(self._owner, self._storage, self._model, self._aliases, k, dtype, full)

    def _averaged_module(self, k: int) -> nn.Module:
        self._check_finite("averaged_module")
        view = _module_view.build(self._owner, self._model, self._storage, k, self._aliases)
        self._views[view] = k
        return view

    def _copy_to(self, model: nn.Module | None, k: int) -> None:
        self._assert_not_swapped("copy_to")
        self._check_finite("copy_to")
        _swap.copy_into(self._storage, self._binder.make(self._model if model is None else model), k)

    @contextlib.contextmanager
    def _swap(self, model: nn.Module | None, k: int, backup_device: torch.device | str | None) -> Iterator[None]:
        self._assert_not_swapped("swapped")
        self._check_finite("swapped")
        _warn_if_frozen_graphs(self._owner)
        target = self._model if model is None else model
        binding = self._binder.fresh(target)
        with _swap.swapped(self._storage, binding, target, k, backup_device):
            self._swapped = True
            try:
                yield
            finally:
                self._swapped = False


def _warn_if_frozen_graphs(owner: str) -> None:
    """``swapped()`` cannot reach weights that inductor's ``freezing=True`` baked into compiled graphs."""
    config = sys.modules.get("torch._inductor.config")
    if config is not None and getattr(config, "freezing", False):
        warnings.warn(
            f"{owner}.swapped(): torch._inductor.config.freezing is on, so graphs compiled from this model hold "
            f"its weights as constants and do not see the swap: a compiled forward inside would use the raw "
            f"weights. Evaluate the uncompiled model, or compile averaged_module() on its own",
            RuntimeWarning,
            stacklevel=4,
        )


def outside_compiled_graphs(update: Callable) -> Callable:
    """Run ``update`` eagerly when a ``torch.compile``'d function calls it: one graph break there.

    Time and decays stay host numbers that no graph sees, so a schedule whose decay changes at
    every step causes no recompiles. torch's lazy form of ``torch.compiler.disable`` is used:
    ``torch._dynamo`` loads on the first call (creating any torch optimizer loads it anyway).
    """
    lazy = getattr(torch, "_disable_dynamo", None)
    return lazy(update) if lazy is not None else torch.compiler.disable(update)


@torch.no_grad()
def _copy_storage(owner: str, old: Storage, new: Storage) -> None:
    """Every average and copy of ``old`` into ``new`` (by name; cast and moved as ``new`` holds them)."""
    values = {name: view for name, view, _, _ in old.tensors(0)}
    for name, view, _, _ in new.tensors(0):
        if values[name].shape != view.shape:
            raise ValueError(
                f"{owner}.to: this rank now holds a part of shape {tuple(view.shape)} of tensor {name!r}, "
                f"the average one of {tuple(values[name].shape)}: the model is sharded differently than when "
                f"the average was created (load a checkpoint into a new average to change the sharding)"
            )
    for k in range(old.num_profiles):
        values = {name: view for name, view, _, _ in old.tensors(k)}
        for name, view, _, _ in new.tensors(k):
            view.copy_(values[name])
    for name, stored in new.copies.items():
        stored.copy_(old.copies[name])
