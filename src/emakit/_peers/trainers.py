"""Training frameworks' EMAs: Composer's EMA algorithm and NeMo's EMA callback, their decay rules and checkpoints.

Owns, for these two peers, what :mod:`emakit._peers.schedules` and :mod:`emakit._peers.formats`
own for the libraries: a schedule class each (the peer's decay sequence, exactly) and a
checkpoint format each; and the tables that add them to the libraries' (:data:`RULES`,
:data:`FORMATS`), which :mod:`emakit.migrate` and :mod:`emakit._peers.checkpoints` use.
Nothing of either peer is imported. Read from their sources:

- Composer (``composer/algorithms/ema/ema.py``, the ``EMAParameters`` form of 0.13 and later):
  the EMA starts at the first update event (``BATCH_END`` for batch units, where the
  timestamp already counts the batch) whose time is ``>= ema_start``, as a copy of the model;
  at every update event where ``batch % update_interval == 0`` it applies
  ``ema = smoothing * ema + (1 - smoothing) * model`` with
  ``smoothing = 2 ** (-update_interval / half_life)``. Its state (``Trainer`` checkpoint:
  ``state.algorithms``, a list of ``(class name, state)``, a dict before that) holds
  ``ema_model = {named_parameters_dict, named_buffers_dict}`` (trainable parameters, all
  buffers), ``ema_weights_active`` and ``ema_started``. Checkpoints are written with the
  averages *swapped into the model*: then ``state.model`` holds the average and
  ``ema_model`` the training weights (``ema_weights_active=True``). ``t`` is
  ``state.timestamp.batch``.
- NeMo (``nemo/collections/common/callbacks/ema.py``: ``EMA`` wraps each optimizer in an
  ``EMAOptimizer``): the average starts as a copy of the parameters at the first
  ``step()``; the ``n``-th ``step()`` (``current_step = n - 1`` before it) applies
  ``ema = decay * ema + (1 - decay) * param`` when ``current_step % every_n_steps == 0``.
  Lightning checkpoints keep it in ``optimizer_states[i]``: ``ema`` (a list over the
  optimizer's parameters), ``current_step`` (``t``), ``decay``, ``every_n_steps``; the
  ``-EMA.ckpt`` file NeMo writes beside each checkpoint holds the same entries.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from torch import Tensor

from .formats import _FORMATS, _count, _Format, _Found, _is_tensor_map
from .reading import _WHERE
from .schedules import _RULES, PeerSchedule, _unit
from .schedules import _count as _check_count

# --------------------------------------------------------------------------- Composer's time strings

_TIME = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(ba|ep|dur)\s*$")


def _timestring(where: str, label: str, value: Any) -> tuple[float, str]:
    """``"1000ba"`` -> ``(1000, "ba")``; units ``ba`` (batches), ``ep`` (epochs), ``dur`` (fraction of the run)."""
    match = _TIME.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(
            f"{where}: {label} must be a Composer time string such as '1000ba', '1ep' or '0.0dur', got {label}={value!r}"
        )
    number, unit = float(match[1]), match[2]
    if unit != "dur" and not number.is_integer():
        raise ValueError(f"{where}: {label} must be a whole number of {unit}, got {label}={value!r}")
    return number, unit


# --------------------------------------------------------------------------- the decay rules


@dataclass(frozen=True, repr=False)
class ComposerEMA(PeerSchedule):
    """Composer's ``EMA`` algorithm: a copy at ``ema_start``, then ``smoothing`` once per ``update_interval``.

    Time ``t`` counts the update unit (batches for ``'ba'``, epochs for ``'ep'``). With
    ``k = update_interval``, ``s = 2 ** (-k / half_life)`` (or ``smoothing``) and ``n0`` the
    first ``n >= 1`` with ``n >= ema_start``::

        decay(n) = 1     if n < n0 (not started)
                 = 0     if n == n0 (the start copies the model)
                 = s     if n % k == 0
                 = 1     otherwise

    ``smoothing`` is applied once per update, whatever ``k`` is; ``half_life`` gives the
    smoothing that makes it a half-life in the unit. ``ema_start`` in ``'dur'`` (a fraction
    of the run) works only as ``'0.0dur'`` (the default: start at the first batch); give
    other starts in the update unit.

        >>> from emakit.migrate import schedule
        >>> s = schedule("composer", half_life="2ba", update_interval="2ba", ema_start="3ba")
        >>> [s(t=n, dt=1) for n in range(1, 7)]
        [1.0, 1.0, 0.0, 0.5, 1.0, 0.5]
    """

    peer: ClassVar[str] = "composer"
    title: ClassVar[str] = "Composer's EMA algorithm"
    half_life: str | None = "1000ba"
    smoothing: float | None = None
    ema_start: str = "0.0dur"
    update_interval: str | None = None
    every: int = field(init=False, repr=False, compare=False)
    start: int = field(init=False, repr=False, compare=False)
    decay: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        w = self._where
        if (self.half_life is None) == (self.smoothing is None):
            raise ValueError(
                f"{w}: give exactly one of half_life or smoothing (as Composer, whose half_life defaults to "
                f"'1000ba': pass half_life=None with smoothing), got half_life={self.half_life!r}, "
                f"smoothing={self.smoothing!r}"
            )
        half = None if self.half_life is None else _timestring(w, "half_life", self.half_life)
        default = f"1{half[1]}" if half is not None else "1ba"
        every, unit = _timestring(w, "update_interval", self.update_interval or default)
        if unit == "dur" or (half is not None and half[1] != unit):
            raise ValueError(
                f"{w}: update_interval must be in batches or epochs, in half_life's unit; got "
                f"update_interval={self.update_interval!r}, half_life={self.half_life!r}"
            )
        if every < 1 or (half is not None and half[0] <= 0):
            raise ValueError(f"{w}: half_life and update_interval must be > 0, got {self.half_life!r}, {every:g}{unit}")
        start, start_unit = _timestring(w, "ema_start", self.ema_start)
        if start_unit != unit and not (start_unit == "dur" and start == 0):
            raise ValueError(
                f"{w}: ema_start={self.ema_start!r} needs the run's length to convert to the update unit "
                f"({unit!r}); give it in {unit!r} (e.g. '0.5dur' of a 10000-batch run is ema_start='5000ba')"
            )
        if self.smoothing is not None:
            _unit(w, "smoothing", self.smoothing)
        decay = 2.0 ** (-every / half[0]) if half is not None else float(self.smoothing)
        object.__setattr__(self, "every", int(every))
        object.__setattr__(self, "start", max(1, int(start)))
        object.__setattr__(self, "decay", decay)

    def step_decay(self, n: int) -> float:
        if n < self.start:
            return 1.0
        if n == self.start:
            return 0.0
        return self.decay if n % self.every == 0 else 1.0


@dataclass(frozen=True, repr=False)
class NeMoEMA(PeerSchedule):
    """NeMo's ``EMA`` callback (``EMAOptimizer``): ``decay`` at every ``every_n_steps``-th optimizer step, no copy.

    At the ``n``-th optimizer step (``current_step = n - 1`` before it)::

        decay(n) = decay   if (n - 1) % every_n_steps == 0
                 = 1       otherwise

    No update copies: the average starts as the weights before the first step, so build the
    emakit EMA where NeMo's callback starts (at ``fit`` start, before the first step).
    ``decay`` is applied once per update, whatever ``every_n_steps`` is.

        >>> from emakit.migrate import schedule
        >>> s = schedule("nemo", decay=0.9, every_n_steps=2)
        >>> [s(t=n, dt=1) for n in range(1, 6)]
        [0.9, 1.0, 0.9, 1.0, 0.9]
    """

    peer: ClassVar[str] = "nemo"
    title: ClassVar[str] = "NeMo's EMA callback"
    decay: float
    every_n_steps: int = 1

    def __post_init__(self) -> None:
        _unit(self._where, "decay", self.decay)
        _check_count(self._where, "every_n_steps", self.every_n_steps, 1)

    def step_decay(self, n: int) -> float:
        return self.decay if (n - 1) % self.every_n_steps == 0 else 1.0


#: Every peer's decay rule: the libraries' and the training frameworks'.
RULES: dict[str, type[PeerSchedule]] = {**_RULES, ComposerEMA.peer: ComposerEMA, NeMoEMA.peer: NeMoEMA}

#: The peers :func:`emakit.migrate.schedule` and :func:`emakit.migrate.ema_like` know.
PEERS: tuple[str, ...] = tuple(RULES)

REQUIRED: dict[str, str] = {"torch_ema": "decay", "nemo": "decay"}  # arguments the peer has no default for


def rule_arguments(cls: type[PeerSchedule]) -> list[str]:
    return [f.name for f in fields(cls) if f.init]


# --------------------------------------------------------------------------- Composer's checkpoints


def _composer_state(obj: Any) -> Mapping | None:
    """The trainer state inside a Composer checkpoint (``checkpoint["state"]``, or the state itself)."""
    if not isinstance(obj, Mapping):
        return None
    state = obj.get("state")
    return state if isinstance(state, Mapping) else obj


def _composer_ema_states(obj: Any) -> list[Mapping]:
    """The EMA algorithm's states in ``obj``: a Trainer checkpoint, its state, or the algorithm's own state dict."""
    if isinstance(obj, Mapping) and "ema_model" in obj and "ema_weights_active" in obj:
        return [obj]
    state = _composer_state(obj)
    algorithms = state.get("algorithms") if state is not None else None
    pairs = list(algorithms.items()) if isinstance(algorithms, Mapping) else algorithms  # a dict before 0.13
    if not isinstance(pairs, (list, tuple)):
        return []
    found = []
    for pair in pairs:
        if isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[1], Mapping):
            if "ema_model" in pair[1] and "ema_weights_active" in pair[1]:
                found.append(pair[1])
    return found


def _is_composer(obj: Any) -> bool:
    return bool(_composer_ema_states(obj))


def _read_composer(obj: Any, name: str | None) -> _Found:
    algos = _composer_ema_states(obj)
    if len(algos) != 1:
        raise ValueError(f"{_WHERE}: the Composer checkpoint holds {len(algos)} EMA algorithm states; expected one")
    algo, state = algos[0], _composer_state(obj)
    ema = algo["ema_model"]
    if isinstance(ema, Mapping) and "named_parameters_dict" in ema:
        tracked = {**ema["named_parameters_dict"], **ema.get("named_buffers_dict", {})}
    else:  # before Composer 0.13: the EMA model's state dict (the training weights under 'training_model')
        tracked = dict(ema) if isinstance(ema, Mapping) else {}
    label = "['state']['algorithms'][EMA]['ema_model']"
    if algo.get("ema_weights_active") is True:
        # Saved at a checkpoint event: the average is swapped into the model, ema_model holds the training weights.
        model = state.get("model") if state is not None and state is not algo else None
        if not _is_tensor_map(model):
            raise ValueError(
                f"{_WHERE}: the Composer EMA state says ema_weights_active=True (the average is in the model's "
                f"weights, 'ema_model' holds the training weights), but no ['state']['model'] came with it: pass the "
                f"whole Trainer checkpoint"
            )
        tracked = {k: model[k] for k in tracked if k in model}
        label = "['state']['model'] (ema_weights_active=True: the average is swapped in there)"
    found = _Found(tracked, label, None)
    timestamp = state.get("timestamp") if state is not None else None
    if isinstance(timestamp, Mapping) and "batch" in timestamp:
        found.t = _count("['state']['timestamp']['batch']", timestamp["batch"])
    else:
        found.no_t = "holds no timestamp (pass the whole Trainer checkpoint, or t=)"
    if algo.get("ema_started") is False:
        found.notes.append(
            "the Composer EMA had not started (ema_started=False): its average is the model at construction, and "
            "the copy at ema_start replaces it"
        )
    return found


# --------------------------------------------------------------------------- NeMo's checkpoints


def _nemo_states(obj: Any) -> list[Mapping]:
    states = obj.get("optimizer_states") if isinstance(obj, Mapping) else None
    if not isinstance(states, (list, tuple)):
        return []
    return [s for s in states if isinstance(s, Mapping) and "ema" in s and "current_step" in s]


def _is_nemo(obj: Any) -> bool:
    return bool(_nemo_states(obj))


def _read_nemo(obj: Any, name: str | None) -> _Found:
    states = _nemo_states(obj)
    steps = {_count("['optimizer_states'][i]['current_step']", s["current_step"]) for s in states}
    if len(steps) != 1:
        raise ValueError(f"{_WHERE}: the NeMo optimizers' EMAs are at different steps {sorted(steps)}; expected one")
    values: list = []
    for s in states:
        if not isinstance(s["ema"], (list, tuple)) or not all(isinstance(v, Tensor) for v in s["ema"]):
            raise TypeError(f"{_WHERE}: ['optimizer_states'][i]['ema'] must be a list of tensors")
        values.extend(s["ema"])
    plural = f" (the {len(states)} optimizers' lists, in order)" if len(states) > 1 else ""
    return _Found(
        None,
        f"['optimizer_states'][i]['ema']{plural}",
        steps.pop(),
        positional=values,
        params_only="NeMo's EMA averages the optimizer's parameters only",
    )


#: Every checkpoint format: the libraries' and the training frameworks'.
FORMATS: dict[str, _Format] = {
    **_FORMATS,
    "composer": _Format(
        "a Composer Trainer checkpoint with the EMA algorithm (['state']['algorithms'] holding the EMA's "
        "'ema_model', 'ema_weights_active', 'ema_started'), or that algorithm's state dict",
        _is_composer,
        _read_composer,
    ),
    "nemo": _Format(
        "a NeMo checkpoint written with the EMA callback (['optimizer_states'][i] holding 'ema', 'current_step', "
        "'decay', 'every_n_steps'), or its -EMA.ckpt companion",
        _is_nemo,
        _read_nemo,
    ),
}

#: The formats :func:`emakit.migrate.load` reads (its ``source=`` values besides ``"auto"``).
SOURCES: tuple[str, ...] = tuple(FORMATS)

__all__ = ["FORMATS", "PEERS", "REQUIRED", "RULES", "SOURCES", "ComposerEMA", "NeMoEMA", "rule_arguments"]
