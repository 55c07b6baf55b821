"""Finding a model's tensors by name, whatever wrapper the model is in.

DataParallel / DistributedDataParallel put the model under ``module.``; ``torch.compile``
puts it (or a compiled submodule) under ``_orig_mod.``. Names are compared after removing
those parts, so an average built on the plain model accepts the wrapped one and its state
dicts carry the plain model's keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

_WRAPPER_PREFIX = "module."
_COMPILE_PART = "_orig_mod"


def normalize_name(name: str) -> str:
    """Remove leading ``module.`` parts and every ``_orig_mod`` part of a dotted name.

    >>> normalize_name("module._orig_mod.net.0.weight")
    'net.0.weight'
    """
    while name.startswith(_WRAPPER_PREFIX):
        name = name[len(_WRAPPER_PREFIX) :]
    if _COMPILE_PART in name:
        name = ".".join(part for part in name.split(".") if part != _COMPILE_PART)
    return name


@dataclass
class Slot:
    """Where one tensor of a model lives: ``module._parameters[attr]`` or ``module._buffers[attr]``."""

    name: str  # normalised
    module: nn.Module
    attr: str
    is_param: bool

    @property
    def table(self) -> dict[str, Tensor]:
        return self.module._parameters if self.is_param else self.module._buffers  # type: ignore[return-value]

    def get(self) -> Tensor:
        return self.table[self.attr]


def model_slots(model: nn.Module) -> tuple[dict[str, Slot], dict[str, str]]:
    """The persistent tensors of ``model``: ``(slots by name, aliases)``.

    ``slots`` maps each normalised name to where the tensor lives, in ``state_dict`` order.
    A tensor reachable under several names (tied weights, shared submodules) is listed once,
    under its first name; ``aliases`` maps every further name to that first one.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    slots: dict[str, Slot] = {}
    aliases: dict[str, str] = {}
    first_name: dict[int, str] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        entries = [(a, t, True) for a, t in module._parameters.items()]
        entries += [(a, t, False) for a, t in module._buffers.items() if a not in module._non_persistent_buffers_set]
        for attr, tensor, is_param in entries:
            if tensor is None:
                continue
            name = normalize_name(dot + attr)
            if name in slots or name in aliases:
                if first_name.get(id(tensor)) in (name, aliases.get(name)):
                    continue  # the same tensor reached again through a shared module
                raise ValueError(
                    f"two different tensors of the model map to the name {name!r} once the "
                    f"'module.' / '_orig_mod.' wrapper prefixes are removed"
                )
            key = id(tensor)
            if key in first_name:
                aliases[name] = first_name[key]
            else:
                first_name[key] = name
                slots[name] = Slot(name, module, attr, is_param)
    return slots, aliases


def is_float(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def default_average_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision and float8 weights (an fp16/bf16 average at decay 0.9999 never moves; torch has no
    float8 arithmetic to average in), else the same."""
    low = dtype in (torch.float16, torch.bfloat16) or (dtype.is_floating_point and dtype.itemsize == 1)
    return torch.float32 if low else dtype


def key_mismatch_message(given: Iterable[str], expected: Iterable[str], shown: int = 3) -> str:
    """What differs between two lists of state-dict keys, and the prefix to strip when that explains it.

    >>> key_mismatch_message(["ema_model.fc.weight", "ema_model.fc.bias"], ["fc.weight", "fc.bias"])
    "2 of 2 expected keys missing (first: ['fc.weight', 'fc.bias']); 2 keys not expected (first: ['ema_model.fc.weight', 'ema_model.fc.bias']); the given keys start with 'ema_model.': strip it"
    """
    given, expected = list(given), list(expected)
    given_set, expected_set = set(given), set(expected)
    missing = [k for k in expected if k not in given_set]
    unexpected = [k for k in given if k not in expected_set]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of {len(expected)} expected keys missing (first: {missing[:shown]})")
    if unexpected:
        parts.append(f"{len(unexpected)} keys not expected (first: {unexpected[:shown]})")
    prefixes = _extra_prefixes(unexpected, missing)
    if len(prefixes) == 1:
        parts.append(f"the given keys start with {prefixes[0]!r}: strip it")
    elif prefixes:
        parts.append(f"the given keys start with {' or '.join(map(repr, prefixes))}: keep the one that holds the average and strip it")
    elif missing and not unexpected:
        parts.append(f"first keys given: {given[:shown]}, expected: {expected[:shown]}")
    return "; ".join(parts)


def _extra_prefixes(unexpected: list[str], missing: list[str]) -> list[str]:
    """The prefixes that, stripped from the unexpected keys, yield the most missing ones (ties: all)."""
    wanted = set(missing)
    counts: dict[str, int] = {}
    for key in unexpected:
        for i in range(1, len(key)):
            if key[i - 1] == "." and key[i:] in wanted:
                counts[key[:i]] = counts.get(key[:i], 0) + 1
                break
    if not counts:
        return []
    best = max(counts.values())
    return [p for p, n in counts.items() if n == best]
