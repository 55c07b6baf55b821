"""The decay rules of other EMA libraries, as emakit schedules (behind :func:`emakit.migrate.schedule`).

Owns one schedule class per peer, each reproducing the peer's decay sequence exactly,
off-by-ones included, and documenting where that differs from what the peer's arguments say.
Pure functions of ``(t, dt)``: no tensors, no models, nothing of the peers is imported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from .. import schedules

# --------------------------------------------------------------------------- argument checks


def _real(where: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise TypeError(f"{where}: {name} must be a real number, got {name}={value!r}")
    return float(value)


def _unit(where: str, name: str, value: Any) -> None:
    if not 0.0 <= _real(where, name, value) <= 1.0:
        raise ValueError(f"{where}: {name} must be in [0, 1], got {name}={value!r}")


def _positive(where: str, name: str, value: Any) -> None:
    if not _real(where, name, value) > 0 or math.isinf(value):
        raise ValueError(f"{where}: {name} must be a finite number > 0, got {name}={value!r}")


def _count(where: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {name} must be an int (a number of steps), got {name}={value!r}")
    if value < minimum:
        raise ValueError(f"{where}: {name} must be >= {minimum}, got {name}={value!r}")


def _flag(where: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be True or False, got {name}={value!r}")


def _ramp(s: float, inv_gamma: float, power: float) -> float:
    """The warm-up curve shared by timm, diffusers and ema-pytorch: ``1 - (1 + s / inv_gamma) ** -power``."""
    return 1.0 - (1.0 + s / inv_gamma) ** -power


# --------------------------------------------------------------------------- the peers' decay rules


@dataclass(frozen=True, repr=False)
class PeerSchedule:
    """A peer's decay rule as an emakit schedule: the product of its per-step decays over ``(t - dt, t]``.

    ``decay(t, dt) = prod(step_decay(n) for n in t - dt + 1 .. t)``; ``t`` and ``dt`` count
    the peer's steps and must be whole numbers. Subclasses define :meth:`step_decay`.
    """

    peer: ClassVar[str] = ""
    title: ClassVar[str] = ""

    @property
    def _where(self) -> str:
        return f"migrate, peer {self.peer!r}"

    def step_decay(self, n: int) -> float:
        """The decay the peer applies at its ``n``-th step (``n >= 1``); 1.0 where it does not update."""
        raise NotImplementedError

    def __call__(self, t: float, dt: float) -> float:
        if not dt > 0 or not t >= dt:
            raise ValueError(f"{self._where}: need dt > 0 and t >= dt (time starts at 0), got t={t}, dt={dt}")
        start, stop = t - dt, t
        if not (float(start).is_integer() and float(stop).is_integer()):
            raise ValueError(
                f"{self._where}: time counts the peer's steps, so t and dt must be whole numbers, got t={t}, dt={dt}"
            )
        out = 1.0
        for n in range(int(start) + 1, int(stop) + 1):
            out *= self.step_decay(n)
            if out == 0.0:
                break
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr)
        return f"migrate.schedule({self.peer!r}, {args})"


@dataclass(frozen=True, repr=False)
class TimmV3(PeerSchedule):
    """timm ``ModelEmaV3``, updated as timm's ``train.py`` does: ``update(model, step=num_updates)``.

    At step ``n`` (``num_updates`` after the optimizer step), with ``s = n - update_after_step - 1``::

        decay(n) = 0                                            if s <= 0 (copy)
                 = decay                                        if not use_warmup
                 = max(min(1 - (1 + s / warmup_gamma) ** -warmup_power, decay), min_decay)

    The copy lasts through step ``update_after_step + 1``; ``min_decay`` only acts with warm-up.

        >>> from emakit.migrate import schedule
        >>> s = schedule("timm", decay=0.999, update_after_step=2)
        >>> [s(t=n, dt=1) for n in (1, 2, 3, 4)]
        [0.0, 0.0, 0.0, 0.999]
    """

    peer: ClassVar[str] = "timm"
    title: ClassVar[str] = "timm's ModelEmaV3"
    decay: float = 0.9999
    min_decay: float = 0.0
    update_after_step: int = 0
    use_warmup: bool = False
    warmup_gamma: float = 1.0
    warmup_power: float = 2 / 3

    def __post_init__(self) -> None:
        w = self._where
        _unit(w, "decay", self.decay)
        _unit(w, "min_decay", self.min_decay)
        _count(w, "update_after_step", self.update_after_step, 0)
        _flag(w, "use_warmup", self.use_warmup)
        _positive(w, "warmup_gamma", self.warmup_gamma)
        _positive(w, "warmup_power", self.warmup_power)

    def step_decay(self, n: int) -> float:
        s = n - self.update_after_step - 1
        if s <= 0:
            return 0.0
        if not self.use_warmup:
            return self.decay
        return max(min(_ramp(s, self.warmup_gamma, self.warmup_power), self.decay), self.min_decay)


@dataclass(frozen=True, repr=False)
class DiffusersEMAModel(PeerSchedule):
    """diffusers ``EMAModel``: a decay that ramps up, with or without ``use_ema_warmup``.

    At the ``n``-th ``step()`` (``optimization_step = n``), with ``s = n - update_after_step - 1``::

        decay(n) = 0                                              if s <= 0 (copy)
                 = max(min(r(s), decay), min_decay)
        r(s)     = 1 - (1 + s / inv_gamma) ** -power              with use_ema_warmup
                 = (1 + s) / (10 + s)                             without: still a ramp

    Without warm-up the decay is 0.917 at step 100 and reaches 0.999 only at step 8991.

        >>> from emakit.migrate import schedule
        >>> s = schedule("diffusers", decay=0.9999)
        >>> s(t=1, dt=1), round(s(t=2, dt=1), 4), round(s(t=100, dt=1), 4)
        (0.0, 0.1818, 0.9174)
    """

    peer: ClassVar[str] = "diffusers"
    title: ClassVar[str] = "diffusers' EMAModel"
    decay: float = 0.9999
    min_decay: float = 0.0
    update_after_step: int = 0
    use_ema_warmup: bool = False
    inv_gamma: float = 1.0
    power: float = 2 / 3

    def __post_init__(self) -> None:
        w = self._where
        _unit(w, "decay", self.decay)
        _unit(w, "min_decay", self.min_decay)
        _count(w, "update_after_step", self.update_after_step, 0)
        _flag(w, "use_ema_warmup", self.use_ema_warmup)
        _positive(w, "inv_gamma", self.inv_gamma)
        _positive(w, "power", self.power)

    def step_decay(self, n: int) -> float:
        s = n - self.update_after_step - 1
        if s <= 0:
            return 0.0
        r = _ramp(s, self.inv_gamma, self.power) if self.use_ema_warmup else (1 + s) / (10 + s)
        return max(min(r, self.decay), self.min_decay)


@dataclass(frozen=True, repr=False)
class EmaPytorchEMA(PeerSchedule):
    """ema-pytorch ``EMA``: a one-step decay applied once every ``update_every`` calls.

    At the ``n``-th ``update()`` call, with ``s = n - 1`` (its ``step`` before the call)::

        decay(n) = 0                          if s == 0 (the first call copies)
                 = 1                          if s % update_every != 0 (no update)
                 = 0                          if s <= update_after_step (copy)
                 = min(max(1 - (1 + (s - update_after_step) / inv_gamma) ** -power, min_value), beta)

    (1 after the copies when ``beta == 1``: a frozen EMA.) The decay is not raised to the
    ``update_every`` steps that passed, so ``update_every=10`` gives a memory ten times
    longer than ``beta`` says. ema-pytorch computes the decay in float32; this is the same
    formula in float64 (they differ by float32 rounding, below 1e-7).

        >>> from emakit.migrate import schedule
        >>> s = schedule("ema_pytorch", update_after_step=2, update_every=2)
        >>> [round(s(t=n, dt=1), 4) for n in (1, 2, 3, 4, 5, 6, 7)]
        [0.0, 1.0, 0.0, 1.0, 0.5193, 1.0, 0.658]
    """

    peer: ClassVar[str] = "ema_pytorch"
    title: ClassVar[str] = "ema-pytorch's EMA"
    beta: float = 0.9999
    update_after_step: int = 100
    update_every: int = 10
    inv_gamma: float = 1.0
    power: float = 2 / 3
    min_value: float = 0.0

    def __post_init__(self) -> None:
        w = self._where
        _unit(w, "beta", self.beta)
        _count(w, "update_after_step", self.update_after_step, 0)
        _count(w, "update_every", self.update_every, 1)
        _positive(w, "inv_gamma", self.inv_gamma)
        _positive(w, "power", self.power)
        _unit(w, "min_value", self.min_value)

    def step_decay(self, n: int) -> float:
        s = n - 1
        if s == 0:
            return 0.0
        if s % self.update_every:
            return 1.0
        if s <= self.update_after_step:
            return 0.0
        if self.beta == 1:
            return 1.0
        value = _ramp(s - self.update_after_step, self.inv_gamma, self.power)
        return min(max(value, self.min_value), self.beta)


@dataclass(frozen=True, repr=False)
class EmaPytorchKarrasEMA(PeerSchedule):
    """ema-pytorch ``KarrasEMA`` (one profile of ``PostHocEMA``): a power EMA stepped once per ``update_every`` calls.

    At the ``n``-th ``update()`` call, with ``s = n - 1`` (its ``step`` before the call)::

        decay(n) = 1                                     if s % update_every != 0 (no update)
                 = 0                                     if s == 0 (the first call copies)
                 = (1 - 1 / (s + 2)) ** (gamma + 1)      otherwise

    This is EDM2's ``(1 - dt / t) ** (gamma + 1)`` at ``t = n + 1`` and ``dt = 1``, whatever
    ``update_every`` is: one time unit too late, and one step where ``update_every`` passed.
    With the default ``update_every=100`` and ``sigma_rel=0.05``, the average after 20k
    steps is centred on step 3037 instead of 18946.

        >>> from emakit.migrate import schedule
        >>> s = schedule("ema_pytorch_karras", gamma=1.0, update_every=1)
        >>> s(t=1, dt=1), round(s(t=2, dt=1), 4), s(t=3, dt=1)  # (2/3)**2, (3/4)**2
        (0.0, 0.4444, 0.5625)
    """

    peer: ClassVar[str] = "ema_pytorch_karras"
    title: ClassVar[str] = "ema-pytorch's KarrasEMA"
    sigma_rel: float | None = None
    gamma: float | None = None
    update_every: int = 100
    exponent: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        w = self._where
        if (self.sigma_rel is None) == (self.gamma is None):
            raise ValueError(
                f"{w}: give exactly one of sigma_rel or gamma, got sigma_rel={self.sigma_rel}, gamma={self.gamma}"
            )
        if self.sigma_rel is not None:
            s = _real(w, "sigma_rel", self.sigma_rel)
            if not 0 < s < schedules.SIGMA_REL_MAX:
                raise ValueError(
                    f"{w}: sigma_rel must be in (0, {schedules.SIGMA_REL_MAX:.4f}), got sigma_rel={self.sigma_rel!r}"
                )
            gamma = schedules.sigma_rel_to_gamma(s)
        else:
            gamma = _real(w, "gamma", self.gamma)
            if not gamma > -1:
                raise ValueError(f"{w}: gamma must be > -1, got gamma={self.gamma!r}")
        _count(w, "update_every", self.update_every, 1)
        object.__setattr__(self, "exponent", gamma + 1.0)

    def step_decay(self, n: int) -> float:
        s = n - 1
        if s % self.update_every:
            return 1.0
        if s == 0:
            return 0.0
        return (1.0 - 1.0 / (s + 2)) ** self.exponent


@dataclass(frozen=True, repr=False)
class AveragedModelEMA(PeerSchedule):
    """torch ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))``: copy, then a constant decay.

    At the ``n``-th ``update_parameters`` call (``n_averaged = n`` after it)::

        decay(n) = 0 if n == 1 (copy), else decay

    The same as ``schedules.start_at(1, schedules.constant(decay))`` when called every step.

        >>> from emakit.migrate import schedule
        >>> s = schedule("averaged_model", decay=0.99)
        >>> s(t=1, dt=1), s(t=2, dt=1), s(t=5, dt=5)
        (0.0, 0.99, 0.0)
    """

    peer: ClassVar[str] = "averaged_model"
    title: ClassVar[str] = "torch's AveragedModel with get_ema_multi_avg_fn"
    decay: float = 0.999

    def __post_init__(self) -> None:
        _unit(self._where, "decay", self.decay)

    def step_decay(self, n: int) -> float:
        return 0.0 if n == 1 else self.decay


@dataclass(frozen=True, repr=False)
class TorchEMA(PeerSchedule):
    """torch-ema ``ExponentialMovingAverage``: a constant decay, capped early by ``(1 + n) / (10 + n)``.

    At the ``n``-th ``update()`` (``num_updates = n`` after it)::

        decay(n) = min(decay, (1 + n) / (10 + n))   if use_num_updates
                 = decay                            otherwise

    No update copies: the first one keeps 2/11 of the average built at construction, so build
    the emakit EMA where the torch-ema one was built.

        >>> from emakit.migrate import schedule
        >>> s = schedule("torch_ema", decay=0.999)
        >>> round(s(t=1, dt=1), 4), s(t=2000, dt=1)
        (0.1818, 0.9955223880597015)
    """

    peer: ClassVar[str] = "torch_ema"
    title: ClassVar[str] = "torch-ema's ExponentialMovingAverage"
    decay: float
    use_num_updates: bool = True

    def __post_init__(self) -> None:
        _unit(self._where, "decay", self.decay)
        _flag(self._where, "use_num_updates", self.use_num_updates)

    def step_decay(self, n: int) -> float:
        if self.use_num_updates:
            return min(self.decay, (1 + n) / (10 + n))
        return self.decay


@dataclass(frozen=True, repr=False)
class LightningEMA(PeerSchedule):
    """Lightning ``EMAWeightAveraging``: copy at the first update, then ``decay`` once per update.

    After optimizer step ``n`` (``trainer.global_step = n``), with ``s = n - 1`` (Lightning's
    ``step_idx``), ``a = update_starting_at_step or 0`` and ``s0`` the first multiple of
    ``update_every_n_steps`` that is ``>= a``::

        decay(n) = 1       if s < a or s % update_every_n_steps != 0 (no update)
                 = 0       if s == s0 (the first update copies)
                 = decay   otherwise

    ``decay`` is applied once per update, whatever ``update_every_n_steps`` is.

        >>> from emakit.migrate import schedule
        >>> s = schedule("lightning", decay=0.9, update_every_n_steps=2, update_starting_at_step=3)
        >>> [s(t=n, dt=1) for n in range(1, 9)]
        [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.9, 1.0]
    """

    peer: ClassVar[str] = "lightning"
    title: ClassVar[str] = "Lightning's EMAWeightAveraging"
    decay: float = 0.999
    update_every_n_steps: int = 1
    update_starting_at_step: int | None = None
    update_starting_at_epoch: None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        w = self._where
        _unit(w, "decay", self.decay)
        _count(w, "update_every_n_steps", self.update_every_n_steps, 1)
        if self.update_starting_at_step is not None:
            _count(w, "update_starting_at_step", self.update_starting_at_step, 0)
        if self.update_starting_at_epoch is not None:
            raise ValueError(
                f"{w}: update_starting_at_epoch={self.update_starting_at_epoch!r} is not supported: Lightning then "
                f"also updates at every epoch end, a second update without an optimizer step between, which a "
                f"time-based EMA cannot express; give update_starting_at_step=<first epoch * steps per epoch> instead"
            )

    @property
    def first_update(self) -> int:
        """Lightning's ``step_idx`` of the first update (the copy)."""
        k, a = self.update_every_n_steps, self.update_starting_at_step or 0
        return -(-a // k) * k

    def step_decay(self, n: int) -> float:
        s = n - 1
        if s < (self.update_starting_at_step or 0) or s % self.update_every_n_steps:
            return 1.0
        return 0.0 if s == self.first_update else self.decay


_RULES: dict[str, type[PeerSchedule]] = {
    cls.peer: cls
    for cls in (TimmV3, DiffusersEMAModel, EmaPytorchEMA, EmaPytorchKarrasEMA, AveragedModelEMA, TorchEMA, LightningEMA)
}

#: The peers :func:`schedule` and :func:`ema_like` know.
PEERS: tuple[str, ...] = tuple(_RULES)


def _rule_arguments(cls: type[PeerSchedule]) -> list[str]:
    return [f.name for f in fields(cls) if f.init]
