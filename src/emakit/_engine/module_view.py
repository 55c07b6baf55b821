"""A module view of an average: the model's own classes, holding the averages as its tensors.

Owns :func:`build` and :func:`refill`. The view is a structural copy of the model (every
submodule a new object of the same class sharing the original's non-tensor attributes: no
``deepcopy``, so it works on modules that refuse it) whose parameters and buffers are the
averages themselves (views of the storage: no copy, always current), the copied tensors
(integer buffers), and, for frozen or excluded tensors, the model's own tensors (shared).
It stays in eval mode: a forward in train mode would write BatchNorm statistics into the
averages, so ``train()`` is refused; so are the calls that would make it drift from the
averages or write into them (casts and moves through ``_apply``: ``half()``, ``to(...)``;
``load_state_dict``; ``apply``), each with an error saying what to do instead.

A model compiled in place (``model.compile()``) keeps its compiled call in the instance,
bound to the model itself: the view compiles its own call instead (with the same settings,
read from the compiled function; eagerly when they cannot be read), and a compiled
submodule (``torch.compile(submodule)``) is rebuilt around the view's copy of it. Either
way the view runs its own tensors, never the model's.

It never writes to the model or to the averages.
"""

from __future__ import annotations

import functools
import sys
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
    # Set through __dict__: a compiled submodule (OptimizedModule) forwards attribute writes to the model's module.
    new.__dict__["_modules"] = {n: (None if c is None else _clone(c, memo)) for n, c in module._modules.items()}
    _recompile(new, module)
    return new


def _recompile(new: nn.Module, old: nn.Module) -> None:
    """Point ``new``'s compiled call (if ``old`` had one) at ``new`` itself, never at ``old``."""
    compiled = old.__dict__.get("_compiled_call_impl")
    if compiled is not None:  # model.compile(): torch.compile(old._call_impl), bound to old
        context = _dynamo_context(compiled)
        new.__dict__["_compiled_call_impl"] = None if context is None else context(new._call_impl)
    initialize = getattr(new, "_initialize", None)
    if "_orig_mod" in new._modules and "dynamo_ctx" in new.__dict__ and callable(initialize):
        initialize()  # torch.compile(module): an OptimizedModule whose forward wraps old._orig_mod


def _dynamo_context(compiled: Any) -> Any:
    """The settings ``torch.compile`` wrapped ``compiled`` with (a dynamo context), or None if unreadable."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    context_type = getattr(eval_frame, "_TorchDynamoContext", None)
    if context_type is None:
        return None
    for cell in getattr(compiled, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, context_type):
            return value
    return None


def _refuse_train(module: nn.Module, mode: bool = True) -> nn.Module:
    if mode:
        raise RuntimeError(
            "averaged_module(): this module is a view of the average and stays in eval mode; in train mode "
            "a forward would write BatchNorm running statistics into the averages. For a train-mode forward "
            "use swapped(), or averaged_state_dict() loaded into a model of your own"
        )
    return module


_WHAT_INSTEAD = (
    "it is a view of the averages: they move with every update and must keep their dtype and device. "
    "Cast or move the averages themselves with ema.to(device, dtype), or take a copy: "
    "averaged_state_dict(dtype=...) loaded into a model of your own"
)


def _refuse_apply(module: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
    """``_apply`` (behind ``to``, ``half``, ``cuda``...): allowed only when it changes no tensor."""
    tensors = [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]
    for t in tensors:
        if fn(t) is not t:
            raise RuntimeError(
                f"averaged_module(): this view refuses a cast or move (to(), half(), cuda()...) that would "
                f"replace its tensors (one of dtype {t.dtype} on {t.device}) with new ones, which would stop "
                f"following the averages; {_WHAT_INSTEAD}"
            )
    return module


def _refuse_write(what: str, *args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(
        f"averaged_module(): {what}() would write into the averages through this view; {_WHAT_INSTEAD}. "
        f"To load averaged weights use ema.load_averaged_state_dict(...); to visit the submodules without "
        f"writing, loop over view.modules()"
    )


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
        module.__dict__["_apply"] = functools.partial(_refuse_apply, module)
        module.__dict__["load_state_dict"] = functools.partial(_refuse_write, "load_state_dict")
        module.__dict__["apply"] = functools.partial(_refuse_write, "apply")
    return view
