"""``EMA``: an exponential moving average of a model's weights, updated after each optimizer step."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import schedules
from ._engine.averager import _Averager, outside_compiled_graphs
from ._engine.clock import check_decay, check_time
from ._engine.model import key_mismatch_message, normalize_name
from ._engine.options import Options, takes_options

__all__ = ["EMA"]


@takes_options
class EMA(_Averager):
    """Exponential moving average of a model's weights: ``ema = decay * ema + (1 - decay) * weights``.

    Give a constant ``decay`` or any ``schedule`` (``f(t, dt) -> decay``, see
    :mod:`emakit.schedules`). At construction the average holds a copy of the model's
    current tensors and ``t = 0``. Call :meth:`update` after every optimizer step.

    What is averaged: trainable floating parameters, and floating buffers (BatchNorm running
    statistics) unless ``buffers="copy"``. Integer and bool buffers (``num_batches_tracked``)
    are always copied. Frozen parameters (``requires_grad=False``) and tensors rejected by
    ``include(name)`` take no memory: they are read from the model when needed.

    Precision and placement: averages of fp16/bf16/float8 weights are kept in fp32 (a bf16 average
    at decay 0.9999 never moves), other dtypes as they are; ``dtype=`` overrides. ``device=``
    keeps the average elsewhere (e.g. ``"cpu"`` to save accelerator memory).

    Args:
        model: the module whose weights are averaged. It is not copied (works on modules
            that cannot be deep-copied); the EMA keeps a reference to read frozen tensors.
        decay: constant decay per unit of time, e.g. 0.9999; same as
            ``schedule=schedules.constant(decay)``.
        schedule: a decay schedule; give ``decay`` or ``schedule``, not both.
        buffers: ``"average"`` (default) or ``"copy"`` for floating buffers.
        include: ``include(name) -> bool`` selects the tensors to track (normalised names).
        dtype: dtype of the averages (default: fp32 for half-precision and float8 weights).
        device: device of the averages (default: the weights' device).
        skip_nonfinite: skip an update (with a warning) when the model holds NaN or Inf.
            Costs one host synchronisation per update.
        locate_nonfinite: mark, on the device, the update that made the average non-finite,
            so that :class:`NonFiniteError` names it exactly (otherwise it names the updates
            between the last check and now). No host synchronisation on an accelerator; each
            chunk of the average is read again while in cache, elements tested (never a sum
            alone, which can overflow): 1.17-1.32x an update on a CPU
            (``benchmarks/bench_update.py``, row ``locate_nonfinite``).
        shard: ``True`` (or a 1-D ``DeviceMesh``) splits the average of a replicated (DDP)
            model across the ranks: each keeps ``1/N`` of it, as DTensors sharded like FSDP2
            would. Sharded models (FSDP2, ZeRO-3) are always averaged shard by shard.

    Distributed training: built on an FSDP2 / tensor-parallel model, each rank averages its
    own shards (no communication per update) and the averages are DTensors with the
    parameters' layout; see ``docs/distributed.md`` for DDP, FSDP2 and DeepSpeed.

    Example::

        ema = emakit.EMA(model, decay=0.9999)
        for batch in loader:
            loss(model, batch).backward()
            optimizer.step()
            optimizer.zero_grad()
            ema.update()
        with ema.swapped():
            evaluate(model)
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float | None = None,
        *,
        schedule: Callable[[float, float], float] | None = None,
        **options: Any,
    ) -> None:
        options = Options.parse("EMA", options)
        if decay is not None and schedule is not None:
            raise ValueError(f"EMA: give decay or schedule, not both; got decay={decay}, schedule={schedule!r}")
        if decay is None and schedule is None:
            raise ValueError("EMA: give decay (e.g. decay=0.9999) or schedule (e.g. schedules.halflife(2000))")
        if decay is not None:
            schedule = schedules.constant(decay)
        if not callable(schedule):
            raise TypeError(f"EMA: schedule must be callable f(t, dt) -> decay, got {schedule!r}")
        super().__init__(model, [schedule], options)

    @property
    def schedule(self) -> Callable[[float, float], float]:
        """The decay schedule, ``f(t, dt) -> decay``."""
        return self._schedules[0]

    @property
    def decay(self) -> float | None:
        """The decay of the last :meth:`update` (what it returned): ``average = decay * average + (1 - decay) * weights``.

        ``None`` before this object's first update, and after :meth:`reset` (a loaded
        checkpoint does not carry it). For logging, as diffusers' ``cur_decay_value``;
        ``schedule(t, dt)`` gives the decay of any other update. An update skipped by
        ``skip_nonfinite`` still sets it (the averages did not move).
        """
        return None if self._last_decays is None else self._last_decays[0]

    def __repr__(self) -> str:
        numel = self._storage.numel
        return (
            f"EMA(schedule={self.schedule!r}, t={self.t}, num_updates={self.num_updates}, "
            f"averaged={len(self._spec.average)} tensors / {numel} elements, copied={len(self._spec.copy)}, "
            f"from model={len(self._spec.live)})"
        )

    # ------------------------------------------------------------------ update

    @outside_compiled_graphs
    def update(self, model: nn.Module | None = None, *, t: float | None = None, dt: float | None = None) -> float:
        """Move the average toward the model's current weights; returns the decay used.

        With no time given, one unit passes (``dt=1``, one optimizer step). ``dt=k`` when
        updating every ``k`` steps; ``t=`` for absolute time (e.g. images seen). ``model``
        may be another view of the same model (DDP, ``torch.compile``); by default the
        model given at construction. No host synchronisation unless ``skip_nonfinite``.
        """
        return self._advance(model, t, dt)[0]

    # ------------------------------------------------------------------ using the average

    def averaged_state_dict(self, *, dtype: str | torch.dtype = "model", full: bool = False) -> dict[str, Tensor]:
        """The model's full state dict with the averaged values (keys of the plain model).

        Averaged and copied tensors come from the EMA, frozen/excluded ones from the model.
        ``dtype="model"`` (default) casts to the model's dtypes, ready for
        ``model.load_state_dict``; ``dtype="average"`` keeps the EMA's precision (fp32 for
        an fp16/bf16 model: save this to resume without losing precision); a floating
        ``torch.dtype`` casts every average to it. Tensors that need no cast share memory
        with the EMA: clone them to keep them past the next update.

        Sharded averages come as DTensors (this rank's shards, ready for ``dcp.save`` or an
        FSDP2 model's ``load_state_dict``). ``full=True`` gathers plain CPU tensors on rank 0
        (an empty dict on the other ranks), one tensor at a time: collective, call it on
        every rank; no rank ever holds more than one full tensor besides rank 0's result.
        """
        return self._averaged_state_dict(0, dtype, full)

    def averaged_module(self) -> nn.Module:
        """An ``nn.Module`` of the model's class whose tensors *are* the averages: no copy, always current.

        For evaluation, teacher / self-distillation forwards, ``torch.compile`` and
        checkpoint savers that want a module (its ``state_dict()`` has the plain model's
        keys). Averaged parameters and buffers are the EMA's own memory (so in its dtype: fp32
        for a bf16 model), integer buffers the EMA's copies, frozen and excluded tensors the
        model's own (shared). Built without ``deepcopy`` (works on modules that refuse it):
        each submodule is a new object of its class sharing the original's other attributes;
        it adds that much memory and no tensor. It stays in eval mode and refuses ``train()``:
        a train-mode forward would write BatchNorm statistics into the averages. Not for
        sharded averages (FSDP2, ZeRO-3, ``shard=True``): no rank holds a whole module.

            teacher = ema.averaged_module()
            with torch.no_grad():
                target = teacher(x)       # the averaged weights of this very moment
        """
        return self._averaged_module(0)

    def swapped(self, model: nn.Module | None = None, *, backup_device: torch.device | str | None = None):
        """Context manager: the model holds the averaged weights inside, its own ones after.

        The model's averaged and copied tensors are backed up (on ``backup_device``,
        default their own device), overwritten with the average, and restored on exit, also
        when the body raises. ``update`` is refused inside.

            with ema.swapped():
                evaluate(model)
        """
        return self._swap(model, 0, backup_device)

    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write the averaged (and copied) tensors into ``model`` (matched by normalised name)."""
        self._copy_to(model, 0)

    # ------------------------------------------------------------------ checkpoints

    _format = "emakit.EMA"

    def _config(self) -> dict[str, Any]:
        return {"schedule": _describe(self.schedule), **super()._config()}

    def _check_config(self, where: str, stored: Mapping[str, Any]) -> None:
        if isinstance(stored.get("schedule"), str):  # (saved by emakit 0.1 with memory addresses in it)
            stored = {**stored, "schedule": _ADDRESS.sub("", stored["schedule"])}
        super()._check_config(where, stored)

    def load_averaged_state_dict(self, state_dict: Mapping[str, Any], *, t: float | None = None) -> None:
        """Load averaged weights from a plain model state dict (e.g. a timm checkpoint).

        Accepts a model ``state_dict`` (keys with or without ``module.`` / ``_orig_mod.``
        prefixes) or a checkpoint holding one under ``"state_dict_ema"`` (timm). Keys the EMA
        does not store (frozen tensors) are ignored. Time is set to ``t`` when given, else
        kept. Checkpoints of other EMA libraries: :func:`emakit.migrate.load`.

        Give ``t`` (the time the average was built to, e.g. the other library's step count)
        when the schedule depends on time: an import at ``t=0`` under a warm-up, power or
        ``start_at`` schedule would be wiped by the next update, whose decay is 0 there. That
        case raises instead, before anything changes, unless the state dict holds exactly the
        model's current weights (k-diffusion's ``--resume-inference`` loads one file into the
        model and its EMA, then restarts the warm-up: the copy loses nothing); so do missing
        keys (the error shows the first keys given and expected, and the prefix to strip when
        that explains them).
        """
        where = "EMA.load_averaged_state_dict"
        self._assert_not_swapped("load_averaged_state_dict")
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{where}: expected a mapping, got {type(state_dict).__name__}")
        if "state_dict_ema" in state_dict:
            state_dict = state_dict["state_dict_ema"]
        if t is not None:
            t = check_time(where, t)
        named = {normalize_name(k): v for k, v in state_dict.items()}
        wanted = [*self._spec.average, *self._spec.copy]
        missing = [n for n in wanted if n not in named]
        if missing:
            raise KeyError(f"{where}: {missing[0]!r} is missing; {key_mismatch_message(list(named), wanted)}")
        averages = {n: named[n] for n in self._spec.average}
        copies = {n: named[n] for n in self._spec.copy}
        self._check_tensor_state(where, averages, copies)
        self._check_import_survives(where, self.t if t is None else t, t is None, averages)
        self._load_tensors(where, 0, averages, copies)
        if t is not None:
            self.t = t

    def _check_import_survives(self, where: str, t: float, t_missing: bool, averages: Mapping[str, Tensor]) -> None:
        """Raise if the update after an import at time ``t`` has decay 0 (it would replace the import),
        unless the import is the model's own weights (k-diffusion's ``--resume-inference``: the
        copy then replaces them by the model, as the peer's first update does)."""
        decay = check_decay(self._owner, self.schedule, t + 1, 1)
        if decay == 0 and not self._equals_model(averages):
            hint = (
                "pass t= the time the average was built to (e.g. the other library's step count)"
                if t_missing
                else "pass the time the average was built to"
            )
            raise ValueError(
                f"{where}: at t={t} the next update has decay 0 under {self.schedule!r} (it copies the model), "
                f"which would replace the imported average; {hint}"
            )

    @torch.no_grad()
    def _equals_model(self, averages: Mapping[str, Tensor]) -> bool:
        """Whether every given average equals the model's tensor of that name (in the model's dtype)."""
        for name, value in averages.items():
            current = self._slots[name].get()
            if type(current.detach()) is not Tensor or type(value.detach()) is not Tensor:
                return False  # sharded (DTensor): not compared
            if not torch.equal(value.to(current.device, current.dtype), current):
                return False
        return True


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _describe(schedule: Any) -> str:
    """``repr(schedule)`` without memory addresses: the same in every process (checkpoints compare it)."""
    return _ADDRESS.sub("", repr(schedule))
