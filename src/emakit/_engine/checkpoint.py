"""Checkpoints of an average: ``state_dict`` / ``load_state_dict``, and DCP ``save`` / ``load``.

Owns the checkpoint format (a dict with ``format``, ``version``, ``t``, counters, settings,
the averages by name per profile and the copies), its checks, and reading tensors back into
the storage. Every check runs before anything is written, so a rejected checkpoint leaves
the average as it was.

:class:`Checkpointing` is a mixin of :class:`emakit._engine.averager._Averager`. It uses the
host's ``_owner``, ``_format``, ``_storage``, ``_num_profiles``, ``_buffers_mode``, ``_spec``,
``_slots``, ``t``, ``num_updates``, ``num_skipped``, ``_assert_not_swapped`` and ``_promote``
(a checkpoint that averages a parameter that is frozen here makes it averaged from then on),
and sets only ``t`` and the counters besides the averages' values. It never writes to the
model or touches its binding.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import distributed
from .._files import collector as _collector
from .._files import dcp as _dcp
from .clock import check_time
from .storage import Storage

STATE_VERSION = 1

#: The small, non-tensor entries of a checkpoint (besides ``config.*``).
_HEADER = ("format", "version", "t", "num_updates", "num_skipped")


class Checkpointing:
    """``state_dict`` / ``load_state_dict`` / ``save`` / ``load`` for an average (a mixin)."""

    _owner: str
    _format: str
    _storage: Storage
    _num_profiles: int
    t: float
    num_updates: int
    num_skipped: int
    _buffers_mode: str

    # ------------------------------------------------------------------ settings

    def _config(self) -> dict[str, Any]:
        return {"buffers": self._buffers_mode, "dtypes": self._storage.dtypes()}

    def _check_config(self, where: str, stored: Mapping[str, Any]) -> None:
        """Warn about stored settings that differ from ours; ours are kept. Subclasses may raise."""
        diffs = [
            f"{k}: stored {stored[k]!r}, this one {v!r}"
            for k, v in self._config().items()
            if k in stored and stored[k] != v
        ]
        if diffs:
            warnings.warn(
                f"{where}: the state dict was saved with other settings; keeping this "
                f"{self._owner}'s ({'; '.join(diffs)})",
                stacklevel=3,
            )

    # ------------------------------------------------------------------ state dicts

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: averages and copies by name, time, counters, config.

        Round-trips through ``torch.save`` / ``torch.load(weights_only=True)``. The tensors
        share memory with the average. Raises :class:`emakit.NonFiniteError` if an average
        holds NaN or Inf (a non-finite weight entered it): such a state is never saved silently.
        """
        self._check_finite("state_dict")
        return self._state()

    def _state(self) -> dict[str, Any]:
        return {
            "format": self._format,
            "version": STATE_VERSION,
            "t": self.t,
            "num_updates": self.num_updates,
            "num_skipped": self.num_skipped,
            "config": self._config(),
            "averages": [self._storage.state_tensors(k) for k in range(self._num_profiles)],
            "copies": dict(self._storage.copies),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; continuing gives bit-identical results to never stopping.

        Everything is checked before anything changes: a wrong format, a missing or
        unexpected name or a wrong shape raises and leaves the average as it was. This
        object's own settings (schedule, dtype, device) are kept; stored settings that
        differ are reported with a warning.
        """
        where = f"{self._owner}.load_state_dict"
        self._assert_not_swapped("load_state_dict")
        t, counts = self._check_header(where, state_dict)
        averages = state_dict.get("averages")
        if not isinstance(averages, (list, tuple)) or len(averages) != self._num_profiles:
            raise ValueError(
                f"{where}: 'averages' must be a list of {self._num_profiles} name -> tensor mappings "
                f"(one per profile), got {type(averages).__name__}"
                f"{f' of {len(averages)}' if isinstance(averages, (list, tuple)) else ''}"
            )
        promoted = self._promotable(averages[0] if averages and isinstance(averages[0], Mapping) else {})
        for profile in averages:
            self._check_tensor_state(where, profile, state_dict.get("copies"), promoted)
        self._promote(promoted)
        for k, profile in enumerate(averages):
            self._load_tensors(where, k, profile, state_dict["copies"])
        self._set_time(t, counts)

    def _set_time(self, t: float, counts: dict[str, int]) -> None:
        self.t = t
        self.num_updates = counts["num_updates"]
        self.num_skipped = counts["num_skipped"]

    def _check_header(self, where: str, state_dict: Mapping[str, Any]) -> tuple[float, dict[str, int]]:
        """Check everything but the tensors; returns ``(t, counters)``."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{where}: expected a mapping, got {type(state_dict).__name__}")
        if state_dict.get("format") != self._format:
            hint = " (a model state dict? use load_averaged_state_dict)" if "format" not in state_dict else ""
            raise ValueError(
                f"{where}: not a {self._owner} state dict: format={state_dict.get('format')!r}, "
                f"expected {self._format!r}{hint}"
            )
        version = state_dict.get("version")
        if not isinstance(version, int) or version > STATE_VERSION:
            raise ValueError(
                f"{where}: state dict version {version!r} is not supported (this emakit reads up to {STATE_VERSION})"
            )
        t = check_time(where, state_dict.get("t"))
        counts = {}
        for key in ("num_updates", "num_skipped"):
            value = state_dict.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{where}: {key} must be an int >= 0, got {key}={value!r}")
            counts[key] = value
        stored = state_dict.get("config", {})
        if not isinstance(stored, Mapping):
            raise ValueError(f"{where}: 'config' must be a mapping, got {type(stored).__name__}")
        self._check_config(where, stored)
        return t, counts

    def _promotable(self, names) -> list[str]:
        """The frozen parameters among ``names``: averaged in the checkpoint, so averaged here from now on."""
        return [n for n in self._spec.frozen if n in names]

    def _check_tensor_state(
        self, where: str, averages: Mapping[str, Any], copies: Mapping[str, Any], promoted: list[str] = ()
    ) -> None:
        """Raise naming the first key whose presence, type or shape does not match."""
        flat = self._storage.flat_names()
        expected_averages = self._storage.state_tensors(0)
        expected_averages.update({n: self._slots[n].get() for n in promoted})
        for label, given, expected in (
            ("averages", averages, expected_averages),
            ("copies", copies, self._storage.copies),
        ):
            if not isinstance(given, Mapping):
                raise TypeError(f"{where}: {label!r} must be a mapping of name -> tensor, got {type(given).__name__}")
            for name in expected:
                if name not in given:
                    raise KeyError(f"{where}: missing tensor {name!r} in {label!r}")
            for name, value in given.items():
                if name not in expected:
                    raise KeyError(
                        f"{where}: unexpected tensor {name!r} in {label!r}; this {self._owner} does not track it"
                    )
                if not isinstance(value, Tensor):
                    raise TypeError(f"{where}: {label}[{name!r}] must be a tensor, got {type(value).__name__}")
                if value.shape != expected[name].shape and value.shape != flat.get(name):
                    raise ValueError(
                        f"{where}: {label}[{name!r}] has shape {tuple(value.shape)}, expected "
                        f"{tuple(expected[name].shape)}"
                    )

    @torch.no_grad()
    def _load_tensors(self, where: str, k: int, averages: Mapping[str, Tensor], copies: Mapping[str, Tensor]) -> None:
        storage = self._storage
        cast = sorted({str(averages[n].dtype) for n, v, _, _ in storage.tensors(k) if averages[n].dtype != v.dtype})
        if cast:
            warnings.warn(
                f"{where}: averages stored as {', '.join(cast)} were cast to this {self._owner}'s "
                f"dtype; its precision is unchanged",
                stacklevel=3,
            )
        for name, view, group, i in storage.tensors(k):
            value = averages[name]
            layout = group.layouts[i]
            if layout is not None:
                value = layout.local_of(value)  # this rank's part (resharded if saved otherwise)
            elif distributed.is_dtensor(value):
                value = value.full_tensor()
            if value.data_ptr() != view.data_ptr() or value.stride() != view.stride():
                view.copy_(value)  # (DCP loads in place: then the value *is* the view)
        for name, stored in storage.copies.items():
            value = copies[name]
            stored.copy_(value.full_tensor() if distributed.is_dtensor(value) else value)

    # ------------------------------------------------------------------ saving itself (DCP)

    @_collector.paused()
    def save(self, path: str | os.PathLike) -> Path:
        """Save this average as a ``torch.distributed.checkpoint`` directory at ``path``.

        Works in one process and in a distributed run, where it is collective: call it on
        every rank with the same path; each rank writes only the parts it holds (nothing is
        gathered). Written under a hidden name and renamed when complete; an existing path
        is never replaced. Resume with :meth:`load`, on any number of ranks. To save the
        average inside your own checkpoint instead, put the object in the dict given to
        ``dcp.save`` (it is a DCP ``Stateful``).
        """
        self._assert_not_swapped("save")
        self._check_finite("save", collective=True)  # every rank raises, or none: none waits in the write
        return _dcp.save_atomic(f"{self._owner}.save", self._state(), Path(path))

    @_collector.paused()
    def load(self, path: str | os.PathLike) -> None:
        """Resume from a :meth:`save` directory, written by any number of ranks (resharded on load).

        Collective in a distributed run. Every stored item is checked against the checksum that
        :meth:`save` recorded as it wrote it (CRC-32, or CRC-32C where the directory names it) (each rank a share of the files; directories without them, from
        ``dcp.save`` or emakit 0.1, are not checked), and format, settings, names and shapes
        against the checkpoint's metadata, before any tensor is read; then each rank reads its
        own parts into staging tensors and copies them into the averages only once all were
        read: a damaged checkpoint raises :class:`emakit._files.dcp.CheckpointError` (an
        ``Exception`` naming the path) and leaves the average exactly as it was. Holds a
        second copy of this rank's averages while loading. DCP metadata is pickled: load only
        checkpoints you trust.
        """
        where = f"{self._owner}.load"
        self._assert_not_swapped("load")
        path = Path(path)
        metadata = _dcp.read_metadata(where, path)
        _dcp.verify_checksums(where, path, metadata)  # every stored item, before anything is read
        meta = metadata.state_dict_metadata
        t, counts = self._check_header(where, _read_dcp_header(where, path, meta))
        promoted = self._promotable({k.removeprefix("averages.0.") for k in meta if k.startswith("averages.0.")})
        state = self._state()  # (also when the averages hold NaN: loading is how to recover)
        tensors = {f"averages.{k}.{n}": v for k, profile in enumerate(state["averages"]) for n, v in profile.items()}
        tensors.update({f"copies.{n}": v for n, v in state["copies"].items()})
        tensors.update({f"averages.{k}.{n}": self._slots[n].get() for k in range(self._num_profiles) for n in promoted})
        for key, tensor in tensors.items():
            size = getattr(meta.get(key), "size", None)
            if size is None:
                raise KeyError(f"{where}: {path} holds no tensor {key!r}; it was saved from another model or average")
            if tuple(size) != tuple(tensor.shape):
                raise ValueError(
                    f"{where}: {path} holds {key!r} with shape {tuple(size)}, expected {tuple(tensor.shape)}"
                )
        # All or nothing: read into staging tensors (this rank's parts, the stored dtype), then copy.
        staged = {key: _empty_like(v, meta[key]) for key, v in tensors.items()}
        _dcp.load(staged, path, where=where)
        self._promote(promoted)
        copies = {n: staged[f"copies.{n}"] for n in state["copies"]}
        for k in range(self._num_profiles):
            prefix = f"averages.{k}."
            profile = {key.removeprefix(prefix): v for key, v in staged.items() if key.startswith(prefix)}
            self._load_tensors(where, k, profile, copies)
        self._set_time(t, counts)


def _empty_like(tensor: Tensor, stored: Any) -> Tensor:
    """A staging tensor for ``tensor`` (plain or DTensor, same layout) in the stored dtype."""
    dtype = getattr(getattr(stored, "properties", None), "dtype", None) or tensor.dtype
    with torch.no_grad():
        return torch.empty_like(tensor.detach(), dtype=dtype)


def _read_dcp_header(where: str, path: Path, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The small entries of a DCP checkpoint (format, version, time, counters, settings) as a header."""
    keys = [k for k in meta if k in _HEADER or k.startswith("config.")]
    small: dict[str, Any] = dict.fromkeys(keys)
    _dcp.load(small, path, flatten=False, where=where)
    header = {k: v for k, v in small.items() if not k.startswith("config.")}
    header["config"] = {k.removeprefix("config."): v for k, v in small.items() if k.startswith("config.")}
    return header
