"""The averager's options: the keywords ``EMA``, ``PowerEMA`` and the Lightning callbacks share.

One definition (:class:`Options`: name, type, default) and one check of the values
(:meth:`Options.parse`), made before anything is built, so the callbacks reject a bad option
when they are constructed rather than when fitting starts. The public constructors take the
options as ``**options``; :func:`takes_options` gives them a full signature (``help()``,
``inspect.signature``, IDE completion) built from the fields, and ``EMA``'s docstring
documents each one (``tests/test_ema.py`` checks that every field is documented there).
Adding an option is one field here, one line of ``EMA``'s docstring, and its use.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .storage import BUFFER_MODES


@dataclass(frozen=True)
class Options:
    """What the averages hold and where, and how non-finite weights are met (see ``EMA``)."""

    buffers: str = "average"
    include: Callable[[str], bool] | None = None
    dtype: torch.dtype | None = None
    device: torch.device | str | None = None
    skip_nonfinite: bool = False
    locate_nonfinite: bool = False
    shard: Any = False

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def parse(cls, owner: str, given: Mapping[str, Any]) -> Options:
        """Check ``given`` (keyword -> value) and fill in the defaults; raises naming ``owner``."""
        unknown = sorted(set(given) - set(cls.names()))
        if unknown:
            raise TypeError(
                f"{owner}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                f"the averager's options are {', '.join(cls.names())}"
            )
        options = cls(**given)
        if options.buffers not in BUFFER_MODES:
            raise ValueError(f"{owner}: buffers must be one of {BUFFER_MODES}, got buffers={options.buffers!r}")
        if options.include is not None and not callable(options.include):
            raise TypeError(f"{owner}: include must be a callable name -> bool, got {options.include!r}")
        dtype = options.dtype
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"{owner}: dtype must be a floating torch.dtype or None, got dtype={dtype!r}")
        if options.device is not None:
            try:
                torch.device(options.device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"{owner}: device must name a torch device, got device={options.device!r}") from e
        return options

    def as_kwargs(self) -> dict[str, Any]:
        """The options as keywords (to build an ``EMA`` / ``PowerEMA`` from them)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def takes_options(cls: type) -> type:
    """Give ``cls.__init__`` (which takes ``**options``) the options as keyword-only parameters in its signature."""
    init = cls.__init__
    signature = inspect.signature(init)
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    hints = {f.name: f.type for f in dataclasses.fields(Options)}
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=getattr(Options, name), annotation=hints[name])
        for name in Options.names()
    ]
    init.__signature__ = signature.replace(parameters=[*params, *extra])
    return cls
