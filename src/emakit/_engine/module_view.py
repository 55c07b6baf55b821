"""A module view of an average: the model's own classes, holding the averages as its tensors.

Owns :func:`build` and :func:`refill`. The view is a structural copy of the model (every
submodule a new object of the same class sharing the original's non-tensor attributes: no
``deepcopy``, so it works on modules that refuse it) whose parameters and buffers are the
averages themselves (views of the storage: no copy, always current), the copied tensors
(integer buffers), and, for frozen or excluded tensors, the model's own tensors (shared).
It stays in eval mode: a forward in train mode would write BatchNorm statistics into the
averages, so ``train()`` is refused.

It never writes to the model or to the averages.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor, nn

from .model import normalize_name
from .storage import Storage


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / DataParallel (``module``) and ``torch.compile`` (``_orig_mod``)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(model._modules.get("_orig_mod"), nn.Module):
            model = model._modules["_orig_mod"]
        else:
            return model


def _clone(module: nn.Module, memo: dict[int, nn.Module]) -> nn.Module:
    """A new object of ``module``'s class sharing its attributes, with its own tables and children."""
    if id(module) in memo:
        return memo[id(module)]
    new = module.__class__.__new__(module.__class__)
    state: dict[str, Any] = dict(module.__dict__)
    for key, value in state.items():
        if key.startswith("_") and isinstance(value, (dict, set)):
            state[key] = type(value)(value)  # parameter/buffer tables, hook dicts: the view's own
    new.__dict__.update(state)
    memo[id(module)] = new
    new._modules = {name: (None if child is None else _clone(child, memo)) for name, child in module._modules.items()}
    return new


def _refuse_train(module: nn.Module, mode: bool = True) -> nn.Module:
    if mode:
        raise RuntimeError(
            "averaged_module(): this module is a view of the average and stays in eval mode; in train mode "
            "a forward would write BatchNorm running statistics into the averages. For a train-mode forward "
            "use swapped(), or averaged_state_dict() loaded into a model of your own"
        )
    return module


def refill(view: nn.Module, storage: Storage, k: int, aliases: dict[str, str]) -> None:
    """Point ``view``'s tensors at profile ``k``'s averages and the copies (after the storage changed)."""
    values: dict[str, Tensor] = {}
    params: set[str] = set()
    for name, tensor, group, _ in storage.tensors(k):
        if group.is_param:
            params.add(name)
            values[name] = nn.Parameter(tensor, requires_grad=False)  # shares the average's memory
        else:
            values[name] = tensor
    values.update(storage.copies)
    for prefix, module in view.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for table in (module._parameters, module._buffers):
            for attr in table:
                name = normalize_name(dot + attr)
                value = values.get(aliases.get(name, name))
                if value is not None:
                    table[attr] = value


def build(owner: str, model: nn.Module, storage: Storage, k: int, aliases: dict[str, str]) -> nn.Module:
    """A view of profile ``k`` shaped like ``model`` (see the module docstring)."""
    if storage.is_sharded:
        raise NotImplementedError(
            f"{owner}.averaged_module(): the averages are sharded across ranks (FSDP2, ZeRO-3 or shard=True), "
            f"so no rank holds a whole module; use swapped(), or averaged_state_dict(full=True) loaded into a "
            f"model on rank 0"
        )
    view = _clone(_unwrap(model), {})
    refill(view, storage, k, aliases)
    for module in view.modules():
        module.training = False
        module.__dict__["train"] = functools.partial(_refuse_train, module)
    return view
