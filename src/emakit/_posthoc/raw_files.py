"""Ordinary training checkpoints as a source for averaging: finding them, their times, their tensors.

A checkpoint is a file or a directory that holds a model's raw weights at one training time
``t`` (a step count). :func:`find` turns what the user gives (paths, a glob, a directory of
checkpoints) into :class:`RawCheckpoint` records sorted by ``t``; :meth:`RawCheckpoint.tensors`
reads one checkpoint's tensors (by normalised name), one checkpoint in memory at a time.

Formats: ``torch.save`` files (``.pt``, ``.pth``, ``.bin``, ``.ckpt``: a plain state dict or
one nested under ``state_dict`` / ``model`` / ``module`` / ... or the key the user names;
read with ``weights_only=True``, never unpickled without ``trust=True``), single safetensors
files, ``save_pretrained`` folders (``model.safetensors`` / ``pytorch_model.bin``, sharded with
an ``.index.json``), Hugging Face Trainer ``checkpoint-*`` folders, Lightning ``.ckpt`` files
and DCP directories (``.metadata``: pickled by DCP, so ``trust=True``).

``t``: given explicitly, else read from the checkpoint (the key the user names, Lightning's
``global_step``, the Trainer's ``trainer_state.json``), else parsed from the name
(``checkpoint-1500``, ``step=1500``, ``epoch=3-step=1500``, ``ckpt_1500.pt``: the last number).
"""

from __future__ import annotations

import glob
import json
import math
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._engine.model import normalize_name

WHERE = "posthoc.average_checkpoints"

#: File suffixes read as checkpoints when a directory is scanned.
SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
#: Where a training script usually nests the model's state dict, tried in this order.
NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "network", "params")
#: Weight files of a save_pretrained / Trainer folder (transformers, then diffusers), tried in this order.
FOLDER_WEIGHTS = ("model", "pytorch_model", "diffusion_pytorch_model")
#: Keys of a step count in a loaded checkpoint, tried in this order.
STEP_KEYS = ("global_step", "step", "num_updates", "iteration", "iter")
#: The largest JSON file read (trainer_state.json, a weights index); real ones are far smaller.
MAX_JSON_BYTES = 64 << 20

_STEP_NAME = re.compile(r"(?:^|[^a-z])step[=_-]?(\d+)", re.IGNORECASE)
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_NUMBER = re.compile(r"\d+")


class CheckpointSourceError(ValueError):
    """The checkpoints given cannot be averaged (missing, unreadable, inconsistent); nothing was written."""


@dataclass
class RawCheckpoint:
    """One checkpoint: where it is, its form, its time and where that time came from."""

    path: Path
    form: str  # "torch", "safetensors", "folder", "dcp"
    t: float
    t_from: str  # "given", "the file name", "['global_step']", "trainer_state.json"

    def tensors(self, key: str | None = None, trust: bool = False) -> dict[str, Tensor]:
        """The checkpoint's model tensors by normalised name (integer buffers included)."""
        if self.form == "safetensors":
            return _named(self.path, _read_safetensors(self.path))
        if self.form == "folder":
            return _named(self.path, _folder_tensors(self.path, trust))
        obj = _load_dcp(self.path) if self.form == "dcp" else torch_load(self.path, trust)
        return _named(self.path, state_dict_of(self.path, obj, key))


# --------------------------------------------------------------------------- finding checkpoints


def find(
    source: Any,
    *,
    times: Sequence[float] | None = None,
    step_key: str | None = None,
    trust: bool = False,
) -> list[RawCheckpoint]:
    """The checkpoints of ``source`` sorted by ``t``; raises :class:`CheckpointSourceError` naming the problem."""
    paths = _paths(source)
    if not paths:
        raise CheckpointSourceError(f"{WHERE}: no checkpoint found in {source!r}")
    if times is not None:
        times = list(times)
        if len(times) != len(paths):
            raise CheckpointSourceError(
                f"{WHERE}: times must give one t per checkpoint, got {len(times)} for {len(paths)} checkpoints"
            )
    found = []
    for i, path in enumerate(paths):
        form = _form(path)
        if form == "dcp" and not trust:
            raise CheckpointSourceError(
                f"{WHERE}: {str(path)!r} is a DCP directory, whose metadata is a pickle: pass trust=True (--trust) "
                f"if you wrote it or trust it"
            )
        if times is not None:
            t, t_from = _check_t(path, times[i], "given"), "given"
        else:
            t, t_from = _time_of(path, form, step_key, trust)
        found.append(RawCheckpoint(path, form, t, t_from))
    found.sort(key=lambda c: c.t)
    for a, b in zip(found, found[1:]):
        if a.t == b.t:
            raise CheckpointSourceError(
                f"{WHERE}: {str(a.path)!r} and {str(b.path)!r} both have t={a.t:g} ({a.t_from}, {b.t_from}); "
                f"give each checkpoint once (a glob or a list of files), or their times with times="
            )
    return found


def _paths(source: Any) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if not Path(text).exists() and glob.has_magic(text):
            return [Path(p) for p in sorted(glob.glob(text))]
        path = Path(text)
        if not path.exists():
            raise CheckpointSourceError(f"{WHERE}: no file or folder at {text!r}")
        if path.is_dir() and not _is_checkpoint_dir(path):
            return [p for p in sorted(path.iterdir()) if _looks_like_checkpoint(p)]
        return [path]
    if isinstance(source, Sequence) and not isinstance(source, (bytes, bytearray)):
        out = []
        for item in source:
            if not isinstance(item, (str, os.PathLike)):
                raise CheckpointSourceError(f"{WHERE}: checkpoints must be paths, got {type(item).__name__} in the list")
            path = Path(item)
            if not path.exists():
                raise CheckpointSourceError(f"{WHERE}: no file or folder at {str(path)!r}")
            out.append(path)
        return out
    raise CheckpointSourceError(
        f"{WHERE}: checkpoints must be a path, a glob or a list of paths, got {type(source).__name__}"
    )


def _looks_like_checkpoint(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    if path.is_dir():
        return _is_checkpoint_dir(path)
    return path.is_file() and path.suffix in SUFFIXES


def _is_checkpoint_dir(path: Path) -> bool:
    return (path / ".metadata").is_file() or _folder_weights(path) is not None


def _form(path: Path) -> str:
    if path.is_dir():
        if (path / ".metadata").is_file():
            return "dcp"
        if _folder_weights(path) is None:
            raise CheckpointSourceError(
                f"{WHERE}: the folder {str(path)!r} holds no model weights (expected model.safetensors, "
                f"pytorch_model.bin, their .index.json, or a DCP .metadata)"
            )
        return "folder"
    if not path.is_file():
        raise CheckpointSourceError(f"{WHERE}: {str(path)!r} is not a regular file")
    return "safetensors" if path.suffix == ".safetensors" else "torch"


def _check_t(path: Path, value: Any, what: str) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise CheckpointSourceError(f"{WHERE}: the time of {str(path)!r} ({what}) must be a number >= 0, got {value!r}")
    return float(value)


def name_step(name: str) -> int | None:
    """The step a checkpoint's name gives: ``step=N`` / ``checkpoint-N`` / the last number; None without one.

    >>> [name_step(n) for n in ("checkpoint-1500", "epoch=3-step=1500.ckpt", "ckpt_1500.pt", "last.pt")]
    [1500, 1500, 1500, None]
    """
    stem = name
    for suffix in (*SUFFIXES, ".safetensors"):
        stem = stem.removesuffix(suffix)
    for pattern in (_CHECKPOINT_NAME, _STEP_NAME):
        match = pattern.search(stem)
        if match:
            return int(match.group(1))
    numbers = _NUMBER.findall(stem)
    return int(numbers[-1]) if numbers else None


def _time_of(path: Path, form: str, step_key: str | None, trust: bool) -> tuple[float, str]:
    """``t`` from the checkpoint when it says, else from the name."""
    if form == "folder":
        state = path / "trainer_state.json"
        if state.is_file() and step_key is None:
            value = read_json(state).get("global_step")
            if value is not None:
                return _check_t(path, value, "trainer_state.json's global_step"), "trainer_state.json"
    elif form == "torch" and (step_key is not None or path.suffix == ".ckpt"):
        # A step key is only looked up on request or in Lightning files: reading a
        # torch.save file costs a full read, which the name usually makes unnecessary.
        obj = torch_load(path, trust)
        for key in (step_key,) if step_key is not None else STEP_KEYS:
            value = _lookup(obj, key)
            if value is not None:
                return _check_t(path, value, f"[{key!r}]"), f"[{key!r}]"
        if step_key is not None:
            raise CheckpointSourceError(f"{WHERE}: {str(path)!r} has no step under step_key={step_key!r}")
    step = name_step(path.name)
    if step is None:
        raise CheckpointSourceError(
            f"{WHERE}: cannot tell the training step of {str(path)!r}: its name holds no number and the file no "
            f"step count; name it like ckpt_1500.pt, pass step_key= (the key of its step), or times="
        )
    return float(step), "the file name"


def _lookup(obj: Any, key: str) -> Any:
    """``obj[key]``, where ``key`` may be a dotted path into nested mappings (``"meta.step"``)."""
    if isinstance(obj, Mapping) and key in obj:
        return obj[key]
    for part in key.split("."):
        if not isinstance(obj, Mapping) or part not in obj:
            return None
        obj = obj[part]
    return obj


# --------------------------------------------------------------------------- reading one checkpoint


def read_json(path: Path) -> Any:
    """A small JSON file (regular, at most :data:`MAX_JSON_BYTES`)."""
    if not path.is_file():
        raise CheckpointSourceError(f"{WHERE}: {str(path)!r} is not a regular file")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointSourceError(f"{WHERE}: {str(path)!r} is {size} bytes, more than a real one ({MAX_JSON_BYTES})")
    try:
        return json.loads(path.read_text())
    except (ValueError, RecursionError) as e:
        raise CheckpointSourceError(f"{WHERE}: {str(path)!r} is not valid JSON: {e}") from None


def torch_load(path: Path, trust: bool) -> Any:
    """``torch.load(weights_only=True)`` (memory-mapped when the file allows); pickles only with ``trust``."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # an old (non-zip) file
    except pickle.UnpicklingError as e:
        if not trust:
            try:
                needs = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception:  # noqa: BLE001 -- not even a torch.save zip file
                needs = []
            if not needs:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CheckpointSourceError(
                    f"{WHERE}: cannot read {str(path)!r} with torch.load(weights_only=True) ({first}); if it is a "
                    f"checkpoint you wrote or trust, pass trust=True (--trust)"
                ) from None
            raise CheckpointSourceError(
                f"{WHERE}: {str(path)!r} holds objects beyond tensors and plain containers ({', '.join(needs[:3])}), "
                f"and is read with torch.load(weights_only=True) only; if you wrote it or trust it, pass trust=True "
                f"(--trust)"
            ) from None
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 -- a damaged or foreign file fails in many ways inside torch.load
        raise CheckpointSourceError(f"{WHERE}: cannot read {str(path)!r} as a torch.save file: {e!r}") from None


def _is_tensor_map(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def state_dict_of(path: Path, obj: Any, key: str | None) -> Mapping[str, Tensor]:
    """The model's state dict inside a loaded checkpoint: under ``key``, or found by the usual keys."""
    if key is not None:
        found = _lookup(obj, key)
        if not _is_tensor_map(found):
            keys = list(obj)[:12] if isinstance(obj, Mapping) else []
            raise CheckpointSourceError(
                f"{WHERE}: {str(path)!r} holds no mapping of tensors under key={key!r} (its keys: {keys})"
            )
        return found
    if _is_tensor_map(obj):
        return obj
    if isinstance(obj, Mapping):
        for candidate in NESTED_KEYS:
            if _is_tensor_map(obj.get(candidate)):
                return obj[candidate]
        keys = list(obj)[:12]
        raise CheckpointSourceError(
            f"{WHERE}: cannot find the model's weights in {str(path)!r} (keys: {keys}); name them with key= (--key)"
        )
    raise CheckpointSourceError(f"{WHERE}: {str(path)!r} holds a {type(obj).__name__}, not a state dict")


def _named(path: Path, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise CheckpointSourceError(f"{WHERE}: {str(path)!r}: {name!r} is a {type(tensor).__name__}, not a tensor")
        plain = normalize_name(str(name))
        if plain in out:
            raise CheckpointSourceError(f"{WHERE}: {str(path)!r} holds {plain!r} twice (with and without a prefix)")
        out[plain] = tensor
    return out


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError(
            f"{WHERE}: reading {str(path)!r} needs the safetensors package: pip install 'emakit[safetensors]'"
        ) from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own error types
        raise CheckpointSourceError(f"{WHERE}: cannot read {str(path)!r}: {e}") from None


def _folder_weights(path: Path) -> Path | None:
    """The weights file (or index) of a save_pretrained / Trainer folder, or None."""
    if not path.is_dir():
        return None
    for stem in FOLDER_WEIGHTS:
        for suffix in (".safetensors", ".bin"):
            for name in (f"{stem}{suffix}", f"{stem}{suffix}.index.json"):
                if (path / name).is_file():
                    return path / name
    return None


def _folder_tensors(path: Path, trust: bool) -> dict[str, Tensor]:
    weights = _folder_weights(path)
    assert weights is not None
    read = _read_safetensors if ".safetensors" in weights.name else (lambda p: state_dict_of(p, torch_load(p, trust), None))
    if not weights.name.endswith(".index.json"):
        return dict(read(weights))
    index = read_json(weights)
    weight_map = index.get("weight_map") if isinstance(index, Mapping) else None
    if not isinstance(weight_map, Mapping):
        raise CheckpointSourceError(f"{WHERE}: {str(weights)!r} has no 'weight_map' mapping names to shard files")
    out: dict[str, Tensor] = {}
    for shard in dict.fromkeys(weight_map.values()):
        shard_path = path / str(shard)
        if Path(str(shard)).name != str(shard) or not shard_path.is_file():
            raise CheckpointSourceError(f"{WHERE}: {str(weights)!r} names a shard {shard!r} that is not in the folder")
        out.update(read(shard_path))
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise CheckpointSourceError(f"{WHERE}: {str(weights)!r} maps {missing[:5]} to shards that do not hold them")
    return out


def _load_dcp(path: Path) -> dict[str, Any]:
    """A whole DCP directory in this process (its metadata is pickled: the caller checked trust)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    try:
        return _load_state_dict_from_keys(checkpoint_id=str(path))
    except Exception as e:  # noqa: BLE001 -- DCP wraps its failures in several types
        raise CheckpointSourceError(f"{WHERE}: cannot read the DCP directory {str(path)!r}: {e}") from None
