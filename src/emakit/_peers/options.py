"""Other EMA libraries' constructor arguments as ``emakit.EMA`` keyword arguments (behind ``migrate.ema_like``).

Owns the mapping of each peer's constructor options (devices, dtypes, buffer handling,
excluded names) onto ``EMA``'s ``device`` / ``dtype`` / ``buffers`` / ``include``, and the
refusals, by name and with the reason, of what emakit cannot honour. Builds no EMA itself.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .._engine.model import normalize_name
from .schedules import _flag

# --------------------------------------------------------------------------- constructor arguments

# Each function below takes the peer constructor's other arguments, with the peer's names and
# defaults, and returns the matching keyword arguments of emakit.EMA (or refuses by name).


class _OnlyParameters:
    """``include`` for peers that track parameters only: buffers stay in the model."""

    def __init__(self, model: nn.Module) -> None:
        self.names = frozenset(normalize_name(n) for n, _ in model.named_parameters(remove_duplicate=False))

    def __call__(self, name: str) -> bool:
        return name in self.names

    def __repr__(self) -> str:
        return f"<parameters only: {len(self.names)} names>"


class _Excluding:
    """``include`` that leaves out given names and names starting with given prefixes."""

    def __init__(self, names: Iterable[str], prefixes: Iterable[str]) -> None:
        self.names = frozenset(names)
        self.prefixes = tuple(sorted(set(prefixes)))

    def __call__(self, name: str) -> bool:
        return name not in self.names and not name.startswith(self.prefixes)

    def __repr__(self) -> str:
        return f"<excluding {sorted(self.names)} and names starting with {list(self.prefixes)}>"


def _names(where: str, label: str, value: Any, model: nn.Module, prefix: bool) -> set[str]:
    """The normalised names (or prefixes) of ``value``; each must match a tensor of the model."""
    if isinstance(value, str) or not isinstance(value, (set, frozenset, list, tuple)):
        raise TypeError(f"{where}: {label} must be a set or list of names, got {label}={value!r}")
    known = {normalize_name(n) for n, _ in model.named_parameters(remove_duplicate=False)}
    known |= {normalize_name(n) for n, _ in model.named_buffers(remove_duplicate=False)}
    out = set()
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"{where}: {label} must hold names (str), got {item!r}")
        name = normalize_name(item)
        found = any(k.startswith(name) for k in known) if prefix else name in known
        if not found:
            what = "prefix of" if prefix else "name of"
            raise ValueError(
                f"{where}: {label} holds {item!r}, which is no {what} a parameter or buffer of the model "
                f"(names as in model.named_parameters(), without 'module.' / '_orig_mod.')"
            )
        out.add(name)
    return out


def _refuse_if(where: str, condition: bool, label: str, value: Any, why: str) -> None:
    if condition:
        raise ValueError(f"{where}: {label}={value!r} is not supported: {why}")


def _timm_options(
    where: str,
    model: nn.Module,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    stochastic_rounding: bool = True,
    stochastic_rounding_seed: int = 0,
    foreach: bool = True,
    exclude_buffers: bool = False,
) -> dict[str, Any]:
    _flag(where, "stochastic_rounding", stochastic_rounding)
    _flag(where, "exclude_buffers", exclude_buffers)
    _refuse_if(
        where,
        dtype == torch.bfloat16 and stochastic_rounding,
        "dtype",
        dtype,
        "with stochastic_rounding=True timm rounds a bf16 average stochastically, emakit rounds to nearest (at "
        "decay 0.9999 a bf16 average then never moves); leave dtype unset for an fp32 average of a bf16 model "
        "(what stochastic rounding approximates), or pass stochastic_rounding=False for timm's plain bf16 average",
    )
    return {"buffers": "copy" if exclude_buffers else "average", "device": device, "dtype": dtype}


def _diffusers_options(
    where: str,
    model: nn.Module,
    *,
    foreach: bool = False,
    model_cls: Any = None,
    model_config: Any = None,
    device: torch.device | str | None = None,
    max_value: float | None = None,
    min_value: float | None = None,
) -> dict[str, Any]:
    for old, new, value in (("max_value", "decay", max_value), ("min_value", "min_decay", min_value)):
        if value is not None:
            raise TypeError(f"{where}: {old} is diffusers' deprecated name of {new}; pass {new}={value!r} instead")
    return {"include": _OnlyParameters(model), "device": device}


def _ema_pytorch_exclusions(where: str, model: nn.Module, no_ema: Any, ignore: Any, ignore_prefixes: Any) -> _Excluding:
    names = _names(where, "param_or_buffer_names_no_ema", no_ema, model, prefix=False)
    names |= _names(where, "ignore_names", ignore, model, prefix=False)
    prefixes = _names(where, "ignore_startswith_names", ignore_prefixes, model, prefix=True)
    return _Excluding(names, prefixes)


def _refuse_ema_model(where: str, ema_model: Any) -> None:
    _refuse_if(
        where,
        ema_model is not None,
        "ema_model",
        type(ema_model).__name__,
        "emakit never copies the module (its averages live in flat buffers); drop it and read the average with "
        "ema.swapped(), ema.copy_to(other_model) or ema.averaged_state_dict()",
    )


def _ema_pytorch_options(
    where: str,
    model: nn.Module,
    *,
    ema_model: Any = None,
    param_or_buffer_names_no_ema: Any = frozenset(),
    ignore_names: Any = frozenset(),
    ignore_startswith_names: Any = frozenset(),
    include_online_model: bool = True,
    allow_different_devices: bool = False,
    use_foreach: bool = False,
    update_model_with_ema_every: int | None = None,
    update_model_with_ema_beta: float = 0.0,
    forward_method_names: Any = (),
    move_ema_to_online_device: bool = False,
    coerce_dtype: bool = False,
    lazy_init_ema: bool = False,
) -> dict[str, Any]:
    _refuse_ema_model(where, ema_model)
    _refuse_if(
        where,
        update_model_with_ema_every is not None,
        "update_model_with_ema_every",
        update_model_with_ema_every,
        "emakit never writes into the model behind your back; call ema.copy_to(model) yourself every so many steps",
    )
    _refuse_if(
        where,
        bool(forward_method_names),
        "forward_method_names",
        forward_method_names,
        "the EMA is not a module to call; run the model's methods inside `with ema.swapped():`",
    )
    _refuse_if(
        where,
        lazy_init_ema is not False,
        "lazy_init_ema",
        lazy_init_ema,
        "emakit allocates the average at construction; build the EMA once the model's parameters exist",
    )
    include = _ema_pytorch_exclusions(where, model, param_or_buffer_names_no_ema, ignore_names, ignore_startswith_names)
    return {"include": include}


def _karras_options(
    where: str,
    model: nn.Module,
    *,
    ema_model: Any = None,
    frozen: bool = False,
    param_or_buffer_names_no_ema: Any = frozenset(),
    ignore_names: Any = frozenset(),
    ignore_startswith_names: Any = frozenset(),
    allow_different_devices: bool = False,
    move_ema_to_online_device: bool = False,
) -> dict[str, Any]:
    _refuse_ema_model(where, ema_model)
    _refuse_if(
        where,
        frozen is not False,
        "frozen",
        frozen,
        "a frozen KarrasEMA never moves after its first copy; load its weights into the model instead of averaging",
    )
    include = _ema_pytorch_exclusions(where, model, param_or_buffer_names_no_ema, ignore_names, ignore_startswith_names)
    return {"include": include}


def _refuse_avg_fns(where: str, avg_fn: Any, multi_avg_fn: Any, hint: str) -> None:
    for label, value in (("avg_fn", avg_fn), ("multi_avg_fn", multi_avg_fn)):
        _refuse_if(
            where,
            value is not None,
            label,
            getattr(value, "__qualname__", type(value).__name__),
            f"an averaging function cannot be read back into a schedule; {hint}",
        )


def _averaged_model_options(
    where: str,
    model: nn.Module,
    *,
    device: torch.device | str | int | None = None,
    avg_fn: Any = None,
    multi_avg_fn: Any = None,
    use_buffers: bool = False,
) -> dict[str, Any]:
    _refuse_avg_fns(
        where, avg_fn, multi_avg_fn, "pass decay=d for get_ema_multi_avg_fn(d) or get_ema_avg_fn(d) (the same rule)"
    )
    _flag(where, "use_buffers", use_buffers)
    return {"buffers": "average" if use_buffers else "copy", "device": device}


def _torch_ema_options(where: str, model: nn.Module) -> dict[str, Any]:
    return {"include": _OnlyParameters(model)}


def _lightning_options(
    where: str,
    model: nn.Module,
    *,
    device: torch.device | str | int | None = None,
    use_buffers: bool = True,
    avg_fn: Any = None,
    multi_avg_fn: Any = None,
) -> dict[str, Any]:
    _refuse_avg_fns(where, avg_fn, multi_avg_fn, "EMAWeightAveraging sets its own (get_ema_avg_fn(decay)): pass decay=")
    _flag(where, "use_buffers", use_buffers)
    return {"buffers": "average" if use_buffers else "copy", "device": device}


def _composer_options(where: str, model: nn.Module) -> dict[str, Any]:
    return {}  # trainable parameters and buffers averaged: emakit's default


def _nemo_options(
    where: str,
    model: nn.Module,
    *,
    validate_original_weights: bool = False,
    cpu_offload: bool = False,
) -> dict[str, Any]:
    _flag(where, "validate_original_weights", validate_original_weights)
    _flag(where, "cpu_offload", cpu_offload)
    return {"include": _OnlyParameters(model), "device": "cpu" if cpu_offload else None}


_OPTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "timm": _timm_options,
    "diffusers": _diffusers_options,
    "ema_pytorch": _ema_pytorch_options,
    "ema_pytorch_karras": _karras_options,
    "averaged_model": _averaged_model_options,
    "torch_ema": _torch_ema_options,
    "lightning": _lightning_options,
    "composer": _composer_options,
    "nemo": _nemo_options,
}


def _option_arguments(peer: str) -> list[str]:
    params = inspect.signature(_OPTIONS[peer]).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
