"""Lightning itself, imported in one place for :mod:`emakit.lightning` and its pieces.

``lightning.pytorch`` or the standalone ``pytorch_lightning`` (same API), 2.2 or newer; otherwise an
``ImportError`` that names the install command.
"""

from __future__ import annotations

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.data import extract_batch_size
except ImportError:  # the standalone package, same API
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from pytorch_lightning.utilities.data import extract_batch_size  # type: ignore[no-redef]
    except ImportError:
        raise ImportError("emakit.lightning needs Lightning 2.2 or newer: pip install 'emakit[lightning]'") from None

__all__ = ["extract_batch_size", "pl"]

if tuple(int(p) for p in pl.__version__.split(".")[:2] if p.isdigit()) < (2, 2):
    raise ImportError(
        f"emakit.lightning needs Lightning 2.2 or newer, found {pl.__version__}: pip install 'emakit[lightning]'"
    )
