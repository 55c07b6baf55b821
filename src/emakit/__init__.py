"""emakit: averaged model weights for PyTorch training.

Classic EMA with composable decay schedules, power-function EMA with snapshots and post-hoc
reconstruction of any EMA length, at memory-bandwidth speed::

    import emakit
    from emakit import schedules

    ema = emakit.EMA(model, decay=0.9999)
    ...
    optimizer.step()
    ema.update()
    with ema.swapped():
        evaluate(model)
"""

from . import posthoc, schedules
from ._engine.nonfinite import NonFiniteError
from .contiguous import contiguous_parameters_
from .ema import EMA
from .power import PowerEMA

__all__ = [
    "EMA",
    "NonFiniteError",
    "PowerEMA",
    "contiguous_parameters_",
    "posthoc",
    "schedules",
    "__version__",
]

__version__ = "0.1.0"

#: Public submodules imported on first access (``emakit.migrate.load(...)`` after ``import emakit``),
#: so that ``import emakit`` stays light and pulls in no optional dependency.
_LAZY = ("contiguous", "distributed", "kernels", "lightning", "migrate", "planning", "snapshots", "verify")


def __getattr__(name: str):
    """``emakit.<submodule>`` for the submodules not imported with ``emakit`` (PEP 562)."""
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
