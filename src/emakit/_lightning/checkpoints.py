"""The averaging callbacks' checkpoints: their callback state, a sharded average's DCP directories, and pruning them.

The callback state holds ``ema.state_dict()`` when the average is replicated (one process, DDP).
A sharded average (FSDP2, ``shard=True``) is written by every rank with ``ema.save()`` into a DCP
directory beside the checkpoints, which the callback state names: Lightning writes callback state
from rank 0 only, which would lose the other ranks' shards. ``checkpoint_weights="averaged"``
puts the average under the checkpoint's ``state_dict`` and the training weights under
:data:`RAW_STATE_DICT_KEY`. :func:`prune_sharded_averages` deletes the DCP directories that no
checkpoint names any more.

A checkpoint written by Lightning's own ``WeightAveraging`` callbacks (``EMAWeightAveraging``) holds
the *average* under ``state_dict`` and the training weights under ``current_model_state``
(:func:`_peer_average` recognises it): the model gets the training weights back, and the callback
imports the average (:mod:`emakit._lightning.callback`) or refuses, never restarting from it.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .pl import pl

#: Checkpoint key of the training weights when ``checkpoint_weights="averaged"`` puts the average under ``state_dict``.
RAW_STATE_DICT_KEY = "emakit_raw_state_dict"
_FORMAT = "emakit.lightning"
_VERSION = 1
_SHARDED_NAME = re.compile(r"(ema|powerema)-step=\d+-[0-9a-f]{8}")


@dataclass(frozen=True)
class _PeerAverage:
    """What a Lightning ``WeightAveraging`` checkpoint holds: its callback, its step, how often it averaged."""

    callback: str  # the callback's state key (its class name: EMAWeightAveraging, or the user's subclass)
    step: int  # trainer.global_step when the checkpoint was saved
    n_averaged: int  # the AveragedModel's updates (0: the average is still the copy made when fitting started)
    raw: Mapping[str, Any]  # the training weights (current_model_state)


def _peer_average(checkpoint: Mapping[str, Any]) -> _PeerAverage | None:
    """The Lightning ``WeightAveraging`` state of ``checkpoint``, or None when it holds none.

    ``WeightAveraging.on_save_checkpoint`` moves the training weights to ``current_model_state``,
    puts the average under ``state_dict`` and its other state (``n_averaged``) under
    ``averaging_state``; its callback state is ``{"latest_update_step": ...}``.
    """
    raw, extra = checkpoint.get("current_model_state"), checkpoint.get("averaging_state")
    if not isinstance(raw, Mapping) or not isinstance(extra, Mapping):
        return None
    states = checkpoint.get("callbacks")
    states = states if isinstance(states, Mapping) else {}
    names = [str(k) for k, v in states.items() if isinstance(v, Mapping) and "latest_update_step" in v]
    n = extra.get("n_averaged")
    n_averaged = int(n.item() if isinstance(n, torch.Tensor) else n) if n is not None else 1
    step = int(checkpoint.get("global_step", 0))
    return _PeerAverage(names[0] if len(names) == 1 else "WeightAveraging", step, n_averaged, raw)


def _plain(name: str) -> str:
    """A state-dict key without ``_orig_mod`` parts (``torch.compile``), as the averages name it."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


class _CheckpointingCallback(pl.Callback):
    """The checkpoint hooks of :class:`emakit._lightning.callback._AveragingCallback`, which sets what they read.

    ``self.ema`` (None before fitting starts), ``self._pending`` (a loaded state waiting for the
    average), ``self._pending_samples``, ``self._interval_steps``, ``self._interval_dt``,
    ``self._trainer``, ``self._sharded_dir``, ``self._owner``, ``self.checkpoint_weights``,
    ``self.state_key``, ``self._averaged_state_dict(full)``, and for a Lightning ``WeightAveraging``
    checkpoint ``self._check_peer_average(peer)`` and ``self._adopt_peer_average(peer, checkpoint)``.
    """

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:
            return dict(self._pending) if self._pending is not None else {}
        state: dict[str, Any] = {
            "format": _FORMAT,
            "version": _VERSION,
            "pending_samples": self._pending_samples,
            "interval_steps": self._interval_steps,  # every_n_steps: optimizer steps since the last update
            "interval_dt": self._interval_dt,  # ... and the time they make
        }
        if self.ema.is_sharded:
            state["dcp"] = self._save_sharded()
        else:
            state["ema"] = self.ema.state_dict()
        return state

    def _save_sharded(self) -> str:
        """Every rank writes its shards into a new DCP directory; returns its path (the same on every rank)."""
        trainer = self._trainer
        base = self._sharded_dir
        if base is None:
            ckpt = trainer.checkpoint_callback
            base = Path(getattr(ckpt, "dirpath", None) or trainer.default_root_dir) / "emakit"
        name = f"{type(self.ema).__name__.lower()}-step={trainer.global_step:09d}-{uuid.uuid4().hex[:8]}"
        path = trainer.strategy.broadcast(str(Path(base, name).absolute()))
        self.ema.save(path)  # collective: each rank its shards, written under a hidden name, renamed when complete
        return path

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") != _FORMAT or not isinstance(state_dict.get("version"), int):
            raise ValueError(
                f"{self._owner}.load_state_dict: not an {_FORMAT} callback state: "
                f"format={state_dict.get('format')!r}, version={state_dict.get('version')!r}"
            )
        if state_dict["version"] > _VERSION:
            raise ValueError(
                f"{self._owner}.load_state_dict: callback state version {state_dict['version']} is newer than "
                f"this emakit reads ({_VERSION})"
            )
        if self.ema is None:
            self._pending = state_dict  # restored when the average is built (on_fit_start)
        else:
            self._restore(state_dict)

    def _restore(self, state: Mapping[str, Any]) -> None:
        if "ema" in state:
            self.ema.load_state_dict(state["ema"])
        else:
            self.ema.load(self._find_sharded(state["dcp"]))  # collective
        self._pending_samples = int(state.get("pending_samples", 0))
        self._interval_steps = int(state.get("interval_steps", 0))
        self._interval_dt = state.get("interval_dt", 0)

    def _find_sharded(self, saved: str) -> Path:
        """The DCP directory a checkpoint names: where it was written, or beside the checkpoint if moved since."""
        candidates = [Path(saved)]
        ckpt_path = getattr(self._trainer, "ckpt_path", None)
        if ckpt_path:
            candidates.append(Path(ckpt_path).absolute().parent / "emakit" / Path(saved).name)
        for path in candidates:
            if (path / ".metadata").is_file():
                return path
        raise FileNotFoundError(
            f"{self._owner}: the checkpoint's sharded average is not at {' nor '.join(map(str, candidates))}; "
            f"it is written beside the checkpoint and must be kept (and moved) with it"
        )

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self.checkpoint_weights != "averaged" or self.ema is None:
            return
        full = self.ema.is_sharded  # DDP shard=True: gathered to rank 0, which writes the file (collective)
        averaged = self._averaged_state_dict(full)
        if not averaged:
            return  # another rank than 0 of a gathered average: rank 0 writes the checkpoint
        raw = checkpoint["state_dict"]
        checkpoint[RAW_STATE_DICT_KEY] = raw
        checkpoint["state_dict"] = {k: averaged.get(_plain(k), v) for k, v in raw.items()}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        states = checkpoint.get("callbacks")
        own = isinstance(states, Mapping) and self.state_key in states
        peer = _peer_average(checkpoint)
        if peer is not None and not own:
            self._check_peer_average(peer)  # raises, before anything changes, where it cannot be continued
        # Lightning has just loaded checkpoint["state_dict"]; when that is an average, the training
        # weights are under RAW_STATE_DICT_KEY (ours) or current_model_state (WeightAveraging's):
        # put them back in the model, which trains on from them.
        raw = checkpoint.get(RAW_STATE_DICT_KEY)
        if raw is None and peer is not None:
            raw = peer.raw
        if raw is not None:
            pl_module.load_state_dict(raw, strict=pl_module.strict_loading)
        if own:
            return
        if peer is not None:
            self._adopt_peer_average(peer, checkpoint)
        elif isinstance(states, Mapping):
            warnings.warn(
                f"{self._owner}: the checkpoint holds no state for {self.state_key} (saved by another callback "
                f"configuration, or before this callback was added); the average starts from the loaded weights",
                RuntimeWarning,
                stacklevel=2,
            )


def _callback_states(path: Path, trust: bool) -> Mapping[str, Any]:
    """The callback states of one Lightning checkpoint file (or an FSDP2 checkpoint's ``meta.pt``).

    ``torch.load(weights_only=True)`` (tensors and plain containers: what Lightning writes) unless
    ``trust``; anything beyond that raises before it is built, since unpickling runs code.
    """
    try:
        loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=not trust)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"prune_sharded_averages: {str(path)!r} holds objects beyond tensors and plain containers, and "
            f"unpickling them would run code from the file; nothing was deleted. If you wrote the checkpoints in "
            f"this directory (or trust whoever did), pass trust=True"
        ) from e
    states = loaded.get("callbacks") if isinstance(loaded, Mapping) else None
    return states if isinstance(states, Mapping) else {}


def prune_sharded_averages(
    checkpoint_dir: str | os.PathLike,
    *,
    sharded_dir: str | os.PathLike | None = None,
    dry_run: bool = False,
    trust: bool = False,
) -> list[Path]:
    """Delete the sharded averages in ``sharded_dir`` that no checkpoint in ``checkpoint_dir`` names; returns them.

    A sharded average is saved as a DCP directory beside the Lightning checkpoint that names it
    (``<checkpoint_dir>/emakit/ema-step=<step>-<id>``). Lightning does not know about those
    directories: when ``ModelCheckpoint(save_top_k=k)`` deletes or overwrites a checkpoint, its
    average stays. Run this on one process, e.g. after training or between runs; it reads every
    ``*.ckpt`` in ``checkpoint_dir`` (files, or FSDP2 checkpoint directories: their ``meta.pt``)
    and deletes only directories named as this module names them.

    The checkpoints are read with ``torch.load(weights_only=True)``, which builds tensors and
    plain containers only (what Lightning writes); a file holding other objects raises before
    anything is deleted, because unpickling them would run code from the file. ``trust=True``
    unpickles everything: only for checkpoints you wrote.

        prune_sharded_averages("lightning_logs/version_0/checkpoints")
    """
    checkpoint_dir = Path(checkpoint_dir)
    sharded_dir = Path(sharded_dir) if sharded_dir is not None else checkpoint_dir / "emakit"
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"prune_sharded_averages: checkpoint_dir={str(checkpoint_dir)!r} is not a directory")
    if not isinstance(trust, bool):
        raise TypeError(f"prune_sharded_averages: trust must be True or False, got trust={trust!r}")
    named = set()
    for ckpt in sorted(checkpoint_dir.glob("*.ckpt")):
        meta = ckpt / "meta.pt" if ckpt.is_dir() else ckpt  # FSDP2 (ModelParallelStrategy): a DCP directory
        if not meta.is_file():
            continue
        for state in _callback_states(meta, trust).values():
            if isinstance(state, Mapping) and state.get("format") == _FORMAT and "dcp" in state:
                named.add(Path(str(state["dcp"])).name)
    unnamed = [
        p
        for p in sorted(sharded_dir.iterdir() if sharded_dir.is_dir() else [])
        if p.is_dir() and _SHARDED_NAME.fullmatch(p.name) and p.name not in named
    ]
    if not dry_run:
        for path in unnamed:
            shutil.rmtree(path)
    return unnamed
