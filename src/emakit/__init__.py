"""emakit: averaged model weights for PyTorch training.

Classic EMA with composable decay schedules, at memory-bandwidth speed::

    import emakit
    from emakit import schedules

    ema = emakit.EMA(model, decay=0.9999)
    ...
    optimizer.step()
    ema.update()
    with ema.swapped():
        evaluate(model)
"""

from . import schedules
from .contiguous import contiguous_parameters_
from .ema import EMA

__all__ = [
    "EMA",
    "contiguous_parameters_",
    "schedules",
    "__version__",
]

__version__ = "0.1.0"
