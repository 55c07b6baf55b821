"""Reading a peer's checkpoint file safely: safetensors, or ``torch.load(weights_only=True)``, never a pickle."""

from __future__ import annotations

import argparse
import datetime
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

_WHERE = "migrate.load"


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError(
            f"{_WHERE}: reading {str(path)!r} needs the safetensors package: pip install 'emakit[safetensors]' "
            f"(or pip install safetensors)"
        ) from None
    return load_file(str(path), device="cpu")


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary objects.

    ``argparse.Namespace`` is allowed too, as timm does: timm's training checkpoints keep the
    command-line arguments under ``args``; so is ``datetime.timedelta`` (Composer's timestamps).
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace, datetime.timedelta]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 -- only used to improve the message
            unsafe = []
        needs = f" (it needs {', '.join(unsafe)})" if unsafe else ""
        raise ValueError(
            f"{_WHERE}: {str(path)!r} holds objects beyond tensors and plain containers{needs}; files are read "
            f"with torch.load(weights_only=True) only. If you trust the file, load it yourself "
            f"(torch.load(path, weights_only=False)) and pass the mapping"
        ) from e
