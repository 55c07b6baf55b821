"""``emakit.migrate.load``: another EMA library's checkpoint into an emakit ``EMA``.

Reads the checkpoint with :mod:`emakit._peers.formats`, matches positional lists to the
model's parameters, completes parameters-only formats with the model's buffers, and hands
the result to ``EMA.load_averaged_state_dict``, which checks shapes and time before writing.
Positional lists (diffusers, torch-ema) are matched to ``model.parameters()`` or to the
trainable parameters, whichever has their length, and checked shape by shape.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor

from .._engine.model import key_mismatch_message, normalize_name
from .formats import _WHERE, _describe, _detect, _Found, _open, _preview
from .trainers import FORMATS as _FORMATS
from .trainers import SOURCES

__all__ = ["SOURCES", "key_mismatch_message", "load"]


# --------------------------------------------------------------------------- matching the model


def _by_position(label: str, values: list, params: list[tuple[str, Tensor]]) -> dict[str, Any]:
    """Name a positional list after ``model.parameters()`` or its trainable ones, whichever it covers."""
    trainable = [(n, p) for n, p in params if p.requires_grad]
    if len(values) == len(params):
        names = params
    elif len(values) == len(trainable):
        names = trainable
    else:
        found = [tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for v in values]
        expected = [(n, tuple(p.shape)) for n, p in params]
        differ = next((i for i, (f, e) in enumerate(zip(found, expected)) if f != e[1]), min(len(found), len(expected)))
        where = (
            f"; it first differs from model.parameters() at index {differ}"
            + (f" (parameter {expected[differ][0]!r}, shape {expected[differ][1]})" if differ < len(expected) else "")
            + (f", where it holds {found[differ]}" if differ < len(found) else "")
        )
        raise ValueError(
            f"{_WHERE}: {label} holds {len(values)} tensors, but the model has {len(params)} parameters "
            f"({len(trainable)} trainable); a positional list must follow model.parameters() or its trainable "
            f"parameters, in order{where}"
        )
    for i, ((name, param), value) in enumerate(zip(names, values)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{_WHERE}: {label}[{i}] (parameter {name!r}) must be a tensor, got {type(value).__name__}")
        if value.shape != param.shape:
            raise ValueError(
                f"{_WHERE}: {label}[{i}] (parameter {name!r}) has shape {tuple(value.shape)}, expected "
                f"{tuple(param.shape)}: the list does not follow this model's parameters"
            )
    return {name: value for (name, _), value in zip(names, values)}


def _state_to_load(source: str, found: _Found, ema: Any) -> tuple[dict[str, Any], list[str]]:
    """The state dict for ``load_averaged_state_dict`` and the buffers taken from the model.

    Raises, naming the first mismatch, when the checkpoint does not fit the EMA's model.
    """
    model = ema._model
    model_state = {normalize_name(k): v for k, v in model.state_dict().items()}
    params = [(normalize_name(n), p) for n, p in model.named_parameters()]
    if found.positional is not None:
        given = _by_position(found.label, found.positional, params)
    else:
        given = {}
        for key, value in found.tensors.items():
            name = normalize_name(key)
            if name in given:
                raise ValueError(
                    f"{_WHERE}: two keys of {found.label} name the tensor {name!r} once the wrapper prefixes "
                    f"('module.', '_orig_mod.') are removed"
                )
            given[name] = value
    param_names = {n for n, _ in params}
    wanted = [*ema._spec.average, *ema._spec.copy]
    from_model = [n for n in wanted if n not in param_names] if found.params_only else []
    needed = [n for n in wanted if n not in from_model]
    missing = [n for n in needed if n not in given]
    unknown = [n for n in given if n not in model_state]
    if missing or unknown:
        problem = f"{missing[0]!r} is missing" if missing else f"{unknown[0]!r} is no tensor of the EMA's model"
        t = f", t={found.t}" if found.t is not None else ", t=..."
        raise KeyError(
            f"{_WHERE}: the {source} checkpoint's {found.label} does not fit the EMA's model: {problem}; "
            f"{key_mismatch_message(list(given), list(model_state))}. Build the EMA on the module these keys "
            f"belong to, or rename the keys and load them with ema.load_averaged_state_dict(state_dict{t})"
        )
    state = {n: given[n] for n in needed}
    state.update((n, model_state[n]) for n in from_model)
    return state, from_model


# --------------------------------------------------------------------------- the entry point


def load(ema: Any, checkpoint: Any, source: str = "auto", *, t: float | None = None) -> str:
    """Load another library's EMA checkpoint into ``ema``; returns the format it read.

    ``checkpoint`` is a mapping (a peer's ``state_dict()``, or a loaded training checkpoint)
    or a path: a file (read with ``torch.load(weights_only=True)``, never unpickling
    anything else), a ``.safetensors`` file, or a diffusers ``EMAModel.save_pretrained``
    folder. ``source`` is ``"auto"`` (recognise the format) or one of :data:`SOURCES`:
    ``"timm"``, ``"diffusers"``, ``"ema_pytorch"``, ``"averaged_model"``, ``"torch_ema"``,
    ``"lightning"``, ``"composer"`` (a Trainer checkpoint with the EMA algorithm; the
    average is read from the model when Composer saved it swapped in), ``"nemo"`` (a
    checkpoint written with NeMo's EMA callback, or its ``-EMA.ckpt`` companion).

    The peer's step counter becomes ``ema.t`` (kept, with a warning, when the checkpoint
    holds none, as timm's do); ``t=`` sets it instead, e.g. the number of optimizer steps a
    timm checkpoint was trained for, or the epoch of a Composer EMA updated per epoch.
    Formats that store parameters only (diffusers, torch-ema, NeMo) take the buffers
    (BatchNorm statistics) from the model, with a warning. Everything is checked before
    anything changes: a checkpoint in no format or in several, a list or keys that do not
    fit the model, or an import the next update would wipe (decay 0 at ``t``) raise and
    leave the EMA as it was. The EMA's own settings (schedule, dtype) are kept.

    Example::

        ema = emakit.EMA(model, decay=0.9999)
        source = emakit.migrate.load(ema, "output/train/last.pth.tar")  # -> "timm"
    """
    if not isinstance(source, str) or (source != "auto" and source not in _FORMATS):
        raise ValueError(f"{_WHERE}: unknown source={source!r}; known: 'auto', {', '.join(map(repr, SOURCES))}")
    if not callable(getattr(ema, "load_averaged_state_dict", None)) or not hasattr(ema, "_spec"):
        raise TypeError(f"{_WHERE}: ema must be an emakit.EMA, got {type(ema).__name__}")
    obj, name = _open(checkpoint)
    if source == "auto":
        source = _detect(obj, _FORMATS)
    elif not _FORMATS[source].matches(obj):
        others = [s for s, fmt in _FORMATS.items() if fmt.matches(obj)]
        looks = f"; it looks like {' or '.join(map(repr, others))}: pass that source or 'auto'" if others else ""
        raise ValueError(
            f"{_WHERE}: source={source!r} expects {_FORMATS[source].layout}; found {_describe(obj)}{looks}"
        )
    found = _FORMATS[source].read(obj, name)
    state, from_model = _state_to_load(source, found, ema)
    ema.load_averaged_state_dict(state, t=found.t if t is None else t)
    if from_model:
        plural = "s" if len(from_model) != 1 else ""
        warnings.warn(
            f"{_WHERE}: {found.params_only}; took {len(from_model)} buffer{plural} from the model "
            f"{_preview(from_model)}",
            UserWarning,
            stacklevel=2,
        )
    if found.t is None and t is None:
        warnings.warn(
            f"{_WHERE}: the {source} checkpoint {found.no_t}; the EMA's t stays {ema.t}. If its schedule depends "
            f"on time, pass t=<step count> to migrate.load",
            UserWarning,
            stacklevel=2,
        )
    for note in found.notes:
        warnings.warn(f"{_WHERE}: {note}", UserWarning, stacklevel=2)
    return source
