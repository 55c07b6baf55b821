"""Other EMA libraries' checkpoint formats: recognising each, and reading its averages and step counter.

Owns the formats and reading files safely (``torch.load(weights_only=True)``, safetensors);
:mod:`emakit._peers.checkpoints` matches what is read to a model and loads it. No peer is
imported: every format is read as plain mappings and lists. What each peer writes (read
from their sources: diffusers 0.42, ema-pytorch 0.8, torch-ema 0.3, torch 2.13, Lightning
2.6, timm 1.0):

- ``"timm"``: a training checkpoint (``CheckpointSaver``) holding the averaged model's state
  dict under ``state_dict_ema`` (older scripts, e.g. DeiT: ``model_ema``), keys maybe
  prefixed ``module.``, next to ``state_dict``, ``epoch``, ``optimizer``, ``args``. It holds
  no step count (``epoch`` counts epochs); ``t`` comes from a ``step`` / ``global_step`` /
  ``num_updates`` entry when a script added one, else it is unknown.
- ``"diffusers"``: ``EMAModel.state_dict()``: ``shadow_params``, a list over the parameters
  the EMAModel was given (diffusers' scripts give ``model.parameters()``: all of them, frozen
  ones included, which it copies), ``optimization_step`` (``t``) and the decay settings.
  ``EMAModel.save_pretrained(folder)``: ``config.json`` with the model's config plus the EMA
  settings (``optimization_step``, ``decay``, ...) and the model weights
  (``diffusion_pytorch_model.safetensors``, maybe sharded), in which only the parameters are
  averaged: the buffers are those of a model freshly built from the config.
- ``"ema_pytorch"``: ``EMA`` / ``KarrasEMA`` module state dicts: the averaged copy under
  ``ema_model.``, the live model under ``online_model.`` (EMA with
  ``include_online_model=True``), ``step`` (``t``, update calls) and ``initted``. PostHocEMA's
  snapshot files ``{i}.{step}.pt`` are KarrasEMA state dicts cast whole to fp16, ``step``
  included.
- ``"averaged_model"``: ``torch.optim.swa_utils.AveragedModel`` state dict: ``module.*`` and
  ``n_averaged`` (``t``).
- ``"torch_ema"``: ``ExponentialMovingAverage.state_dict()``: ``shadow_params`` (a list over
  the parameters it was given), ``num_updates`` (``t``; None with ``use_num_updates=False``),
  ``decay``, ``collected_params``.
- ``"lightning"``: a checkpoint written with a ``WeightAveraging`` callback
  (``EMAWeightAveraging``): the *averaged* model in ``state_dict`` (LightningModule keys),
  the live one in ``current_model_state``, ``averaging_state = {"n_averaged": ...}``; ``t``
  is the callback's ``latest_update_step`` (the optimizer step of its last update), else
  ``global_step``.

Positional lists (diffusers, torch-ema) are matched to ``model.parameters()`` or to the
trainable parameters, whichever has their length, and checked shape by shape.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .reading import _WHERE, _read_safetensors, _torch_load

_SHOWN = 5  # keys shown in error messages


# --------------------------------------------------------------------------- what a format yields


@dataclass
class _Found:
    """What a checkpoint holds, in emakit's terms (nothing checked against the model yet)."""

    tensors: dict[str, Tensor] | None  # by name, or None when ``positional`` is given
    label: str  # where the tensors are in the checkpoint, for messages: "['state_dict_ema']"
    t: float | None  # the peer's step counter, None when the checkpoint holds none
    positional: list | None = None  # tensors in model.parameters() order (diffusers, torch-ema)
    params_only: str | None = None  # why buffers must come from the model, when they must
    no_t: str = ""  # why t is unknown
    notes: list[str] = field(default_factory=list)  # further warnings


@dataclass
class _Folder:
    """A directory given as checkpoint: a diffusers ``save_pretrained`` folder if it has its files."""

    path: Path
    config: Any  # parsed config.json, or None when there is none


# --------------------------------------------------------------------------- small readers


def _preview(keys, n: int = _SHOWN) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}]"


def _describe(obj: Any) -> str:
    if isinstance(obj, _Folder):
        files = sorted(p.name for p in obj.path.iterdir())
        return f"the folder {str(obj.path)!r} (files: {_preview(files)})"
    if isinstance(obj, Mapping):
        return f"a mapping with {len(obj)} keys {_preview(obj)}"
    return f"a {type(obj).__name__}"


def _is_tensor_map(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def _count(label: str, value: Any) -> float:
    """A stored step counter as a number >= 0 (ints stay ints; 1-element tensors are read)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{_WHERE}: {label} must be a single number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{_WHERE}: {label} must be a step count >= 0, got {label}={value!r}")
    return int(value) if float(value).is_integer() else value


def _strip(tensors: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if isinstance(k, str) and k.startswith(prefix)}


# --------------------------------------------------------------------------- the formats


# timm -------------------------------------------------------------------------------------

_TIMM_KEYS = ("state_dict_ema", "model_ema")  # timm's load_state_dict looks in this order
_STEP_KEYS = ("step", "global_step", "num_updates")  # added by some training scripts; not by timm's saver


def _is_timm(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(_is_tensor_map(obj.get(k)) for k in _TIMM_KEYS)


def _read_timm(obj: Mapping, name: str | None) -> _Found:
    key = next(k for k in _TIMM_KEYS if _is_tensor_map(obj.get(k)))
    step_key = next((k for k in _STEP_KEYS if k in obj), None)
    found = _Found(dict(obj[key]), f"[{key!r}]", None)
    if step_key is not None:
        found.t = _count(f"[{step_key!r}]", obj[step_key])
    else:
        epoch = f" (only epoch={obj['epoch']!r}, which counts epochs)" if "epoch" in obj else ""
        found.no_t = f"holds no step count{epoch}"
    return found


# diffusers --------------------------------------------------------------------------------

_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
_DIFFUSERS_EMA_CONFIG = ("optimization_step", "decay")  # EMAModel.save_pretrained registers its state_dict


def _is_diffusers(obj: Any) -> bool:
    if isinstance(obj, _Folder):
        return isinstance(obj.config, Mapping) and all(k in obj.config for k in _DIFFUSERS_EMA_CONFIG)
    return (
        isinstance(obj, Mapping) and isinstance(obj.get("shadow_params"), (list, tuple)) and "optimization_step" in obj
    )


def _read_diffusers(obj: Any, name: str | None) -> _Found:
    if isinstance(obj, _Folder):
        return _Found(
            _folder_weights(obj.path),
            f"folder {obj.path.name!r}",
            _count("config.json's optimization_step", obj.config["optimization_step"]),
            params_only=(
                "an EMAModel.save_pretrained folder averages parameters only (its buffers are those of a model "
                "freshly built from the config)"
            ),
        )
    return _Found(
        None,
        "['shadow_params']",
        _count("['optimization_step']", obj["optimization_step"]),
        positional=list(obj["shadow_params"]),
        params_only="a diffusers EMAModel state dict holds parameters only",
    )


def _folder_weights(path: Path) -> dict[str, Tensor]:
    """The model weights of a diffusers ``save_pretrained`` folder (single file or sharded)."""
    for suffix, read in ((".safetensors", _read_safetensors), (".bin", _torch_load)):
        single = path / f"{_DIFFUSERS_WEIGHTS}{suffix}"
        if single.is_file():
            return dict(read(single))
        index = path / f"{_DIFFUSERS_WEIGHTS}{suffix}.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, Mapping):
                raise ValueError(f"{_WHERE}: {str(index)!r} has no 'weight_map' mapping names to shard files")
            out: dict[str, Tensor] = {}
            for shard in dict.fromkeys(weight_map.values()):
                out.update(read(path / shard))
            return out
    raise ValueError(
        f"{_WHERE}: the diffusers folder {str(path)!r} has no model weights: expected "
        f"{_DIFFUSERS_WEIGHTS}.safetensors (or .bin, or a sharded .index.json), found {_preview(os.listdir(path))}"
    )


# ema-pytorch ------------------------------------------------------------------------------

_EMA_MODEL = "ema_model."
_POSTHOC = re.compile(r"ema_models\.(\d+)\.ema_model\.")
_POSTHOC_FILE = re.compile(r"^\d+\.(\d+)\.pt$")  # PostHocEMA.checkpoint(): f"{index}.{step}.pt"


def _is_ema_pytorch(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping) and "step" in obj and any(isinstance(k, str) and k.startswith(_EMA_MODEL) for k in obj)
    )


def _read_ema_pytorch(obj: Mapping, name: str | None) -> _Found:
    found = _Found(_strip(obj, _EMA_MODEL), "['ema_model.*']", _count("['step']", obj["step"]))
    step = obj["step"]
    if isinstance(step, Tensor) and step.is_floating_point():
        # PostHocEMA snapshots cast the whole state dict, step included, to fp16: exact to 2048 only.
        named = _POSTHOC_FILE.match(name or "")
        if named and torch.tensor(int(named[1]), dtype=step.dtype) == step.reshape(()):
            found.t = int(named[1])  # the file name holds the exact step
        elif found.t > 2 / torch.finfo(step.dtype).eps:  # whole numbers are exact up to 2 / eps
            found.notes.append(
                f"['step'] is stored as {step.dtype} (PostHocEMA snapshots cast everything), so "
                f"t={found.t} may be rounded; the snapshot's file name '{{index}}.{{step}}.pt' holds the exact step"
            )
    return found


# torch AveragedModel ----------------------------------------------------------------------

_MODULE = "module."


def _is_averaged_model(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or "n_averaged" not in obj:
        return False
    others = [k for k in obj if k != "n_averaged"]
    return bool(others) and all(isinstance(k, str) and k.startswith(_MODULE) for k in others)


def _read_averaged_model(obj: Mapping, name: str | None) -> _Found:
    return _Found(_strip(obj, _MODULE), "['module.*']", _count("['n_averaged']", obj["n_averaged"]))


# torch-ema --------------------------------------------------------------------------------


def _is_torch_ema(obj: Any) -> bool:
    return isinstance(obj, Mapping) and isinstance(obj.get("shadow_params"), (list, tuple)) and "num_updates" in obj


def _read_torch_ema(obj: Mapping, name: str | None) -> _Found:
    found = _Found(
        None,
        "['shadow_params']",
        None,
        positional=list(obj["shadow_params"]),
        params_only="a torch-ema state dict holds parameters only",
    )
    if obj["num_updates"] is None:
        found.no_t = "holds no step count (num_updates=None: it was built with use_num_updates=False)"
    else:
        found.t = _count("['num_updates']", obj["num_updates"])
    return found


# Lightning --------------------------------------------------------------------------------


def _is_lightning(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and isinstance(obj.get("state_dict"), Mapping)
        and isinstance(obj.get("averaging_state"), Mapping)
    )


def _read_lightning(obj: Mapping, name: str | None) -> _Found:
    # WeightAveraging.state_dict() is {"latest_update_step": ...}, under the callback's state key
    # (its class name, which users choose when they subclass WeightAveraging).
    callbacks = obj.get("callbacks")
    latest = [
        state["latest_update_step"]
        for state in (callbacks.values() if isinstance(callbacks, Mapping) else ())
        if isinstance(state, Mapping) and "latest_update_step" in state
    ]
    if len(latest) == 1:
        t = _count("the WeightAveraging callback's latest_update_step", latest[0])
    elif "global_step" in obj:
        t = _count("['global_step']", obj["global_step"])
    elif "n_averaged" in obj["averaging_state"]:
        t = _count("['averaging_state']['n_averaged']", obj["averaging_state"]["n_averaged"])
    else:
        t = None
    found = _Found(dict(obj["state_dict"]), "['state_dict']", t)
    if t is None:
        found.no_t = "holds no step count (no latest_update_step, global_step or n_averaged)"
    return found


# the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Format:
    layout: str  # what it looks like, for error messages
    matches: Callable[[Any], bool]
    read: Callable[[Any, str | None], _Found]


_FORMATS: dict[str, _Format] = {
    "timm": _Format(
        "a timm training checkpoint: the averaged model's state dict under 'state_dict_ema' (or 'model_ema')",
        _is_timm,
        _read_timm,
    ),
    "diffusers": _Format(
        "a diffusers EMAModel.state_dict() ('shadow_params' list, 'optimization_step', 'decay', ...) or an "
        "EMAModel.save_pretrained folder (config.json with 'optimization_step' and 'decay', and the weights)",
        _is_diffusers,
        _read_diffusers,
    ),
    "ema_pytorch": _Format(
        "an ema-pytorch EMA / KarrasEMA state dict ('ema_model.*' tensors, 'step', 'initted', maybe 'online_model.*')",
        _is_ema_pytorch,
        _read_ema_pytorch,
    ),
    "averaged_model": _Format(
        "a torch AveragedModel state dict ('module.*' tensors and 'n_averaged')",
        _is_averaged_model,
        _read_averaged_model,
    ),
    "torch_ema": _Format(
        "a torch-ema ExponentialMovingAverage.state_dict() ('shadow_params' list, 'num_updates', 'decay', "
        "'collected_params')",
        _is_torch_ema,
        _read_torch_ema,
    ),
    "lightning": _Format(
        "a Lightning checkpoint written with a WeightAveraging callback such as EMAWeightAveraging (the averaged "
        "model in 'state_dict', 'averaging_state', 'current_model_state')",
        _is_lightning,
        _read_lightning,
    ),
}

#: The formats :func:`load` reads (its ``source=`` values besides ``"auto"``).
SOURCES: tuple[str, ...] = tuple(_FORMATS)


def _hint(obj: Any) -> str:
    """Why an object matches no format, and what to do instead; "" when there is nothing to add."""
    if isinstance(obj, _Folder):
        if obj.config is None:
            return "; a folder must be a diffusers EMAModel.save_pretrained folder, and this one has no config.json"
        return (
            "; its config.json has no EMA settings ('optimization_step', 'decay'): a plain model folder, not one "
            "written by EMAModel.save_pretrained; to use its weights as the average, load them with "
            "ema.load_averaged_state_dict(weights, t=...)"
        )
    if not isinstance(obj, Mapping):
        return ""
    if str(obj.get("format", "")).startswith("emakit."):
        return "; this is an emakit state dict: use ema.load_state_dict(state_dict)"
    posthoc = sorted({int(m[1]) for k in obj if isinstance(k, str) and (m := _POSTHOC.match(k))})
    if posthoc:
        return (
            f"; it is an ema-pytorch PostHocEMA state dict holding {len(posthoc)} KarrasEMAs: pass one of them, "
            f"e.g. {{k.removeprefix('ema_models.{posthoc[0]}.'): v for k, v in sd.items() "
            f"if k.startswith('ema_models.{posthoc[0]}.')}}"
        )
    if "shadow_params" in obj:
        return "; it has 'shadow_params' but neither 'optimization_step' (diffusers) nor 'num_updates' (torch-ema)"
    if isinstance(obj.get("state_dict"), Mapping):
        return (
            "; it holds a 'state_dict' but no averaged weights (no 'state_dict_ema' / 'model_ema' as timm writes, "
            "no 'averaging_state' as Lightning's WeightAveraging writes); if its 'state_dict' is the average, use "
            "ema.load_averaged_state_dict(checkpoint['state_dict'], t=...)"
        )
    if _is_tensor_map(obj):
        return "; it looks like a plain model state dict: load it with ema.load_averaged_state_dict(state_dict, t=...)"
    return ""


def _detect(obj: Any, table: Mapping[str, _Format] | None = None) -> str:
    """The one format of ``table`` (default: the libraries') that ``obj`` matches; raises naming them otherwise."""
    table = _FORMATS if table is None else table
    matches = [source for source, fmt in table.items() if fmt.matches(obj)]
    if len(matches) > 1:
        raise ValueError(
            f"{_WHERE}: {_describe(obj)} matches several formats ({', '.join(map(repr, matches))}); "
            f"pass source= one of them"
        )
    if not matches:
        known = "; ".join(f"{s!r}: {fmt.layout}" for s, fmt in table.items())
        raise ValueError(f"{_WHERE}: {_describe(obj)} is in no known format{_hint(obj)}. Known formats: {known}")
    return matches[0]


# --------------------------------------------------------------------------- reading paths


def _open(checkpoint: Any) -> tuple[Any, str | None]:
    """The checkpoint as a mapping (or a :class:`_Folder`), and its file name when it came from a path."""
    if isinstance(checkpoint, (str, os.PathLike)):
        path = Path(checkpoint)
        if path.is_dir():
            config = path / "config.json"
            return _Folder(path, json.loads(config.read_text()) if config.is_file() else None), path.name
        if not path.is_file():
            raise FileNotFoundError(f"{_WHERE}: no file or folder at {str(path)!r}")
        if path.suffix == ".safetensors":
            return _read_safetensors(path), path.name
        return _torch_load(path), path.name
    if isinstance(checkpoint, Mapping):
        return checkpoint, None
    hint = "; pass its .state_dict()" if callable(getattr(checkpoint, "state_dict", None)) else ""
    raise TypeError(
        f"{_WHERE}: checkpoint must be a mapping (a peer's state dict or a loaded checkpoint) or a path, "
        f"got {type(checkpoint).__name__}{hint}"
    )
