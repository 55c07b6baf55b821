"""The averaging callbacks' checkpoints: their callback state, a sharded average's DCP directories, and pruning them.

The callback state holds ``ema.state_dict()`` when the average is replicated (one process, DDP).
A sharded average (FSDP2, ``shard=True``) is written by every rank with ``ema.save()`` into a DCP
directory beside the checkpoints, which the callback state names: Lightning writes callback state
from rank 0 only, which would lose the other ranks' shards. ``checkpoint_weights="averaged"``
puts the average under the checkpoint's ``state_dict`` and the training weights under
:data:`RAW_STATE_DICT_KEY`. :func:`prune_sharded_averages` deletes the DCP directories that no
checkpoint names any more.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .pl import pl

#: Checkpoint key of the training weights when ``checkpoint_weights="averaged"`` puts the average under ``state_dict``.
RAW_STATE_DICT_KEY = "emakit_raw_state_dict"
_FORMAT = "emakit.lightning"
_VERSION = 1
_SHARDED_NAME = re.compile(r"(ema|powerema)-step=\d+-[0-9a-f]{8}")


def _plain(name: str) -> str:
    """A state-dict key without ``_orig_mod`` parts (``torch.compile``), as the averages name it."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


class _CheckpointingCallback(pl.Callback):
    """The checkpoint hooks of :class:`emakit._lightning.callback._AveragingCallback`, which sets what they read.

    ``self.ema`` (None before fitting starts), ``self._pending`` (a loaded state waiting for the
    average), ``self._pending_samples``, ``self._trainer``, ``self._sharded_dir``, ``self._owner``,
    ``self.checkpoint_weights``, ``self.state_key`` and ``self._averaged_state_dict(full)``.
    """

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:
            return dict(self._pending) if self._pending is not None else {}
        state: dict[str, Any] = {"format": _FORMAT, "version": _VERSION, "pending_samples": self._pending_samples}
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
        if isinstance(states, Mapping) and self.state_key not in states:
            warnings.warn(
                f"{self._owner}: the checkpoint holds no state for {self.state_key} (saved by another callback "
                f"configuration, or before this callback was added); the average starts from the loaded weights",
                RuntimeWarning,
                stacklevel=2,
            )
        # Lightning has just loaded checkpoint["state_dict"]; when that is the average, the
        # training weights are under RAW_STATE_DICT_KEY: put them back in the model.
        raw = checkpoint.get(RAW_STATE_DICT_KEY)
        if raw is not None:
            pl_module.load_state_dict(raw, strict=pl_module.strict_loading)


def prune_sharded_averages(
    checkpoint_dir: str | os.PathLike, *, sharded_dir: str | os.PathLike | None = None, dry_run: bool = False
) -> list[Path]:
    """Delete the sharded averages in ``sharded_dir`` that no checkpoint in ``checkpoint_dir`` names; returns them.

    A sharded average is saved as a DCP directory beside the Lightning checkpoint that names it
    (``<checkpoint_dir>/emakit/ema-step=<step>-<id>``). Lightning does not know about those
    directories: when ``ModelCheckpoint(save_top_k=k)`` deletes or overwrites a checkpoint, its
    average stays. Run this on one process, e.g. after training or between runs; it reads every
    ``*.ckpt`` in ``checkpoint_dir`` (files, or FSDP2 checkpoint directories) with pickle (load
    only your own checkpoints) and deletes only directories named as this module names them.

        prune_sharded_averages("lightning_logs/version_0/checkpoints")
    """
    checkpoint_dir = Path(checkpoint_dir)
    sharded_dir = Path(sharded_dir) if sharded_dir is not None else checkpoint_dir / "emakit"
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"prune_sharded_averages: checkpoint_dir={str(checkpoint_dir)!r} is not a directory")
    named = set()
    for ckpt in checkpoint_dir.glob("*.ckpt"):
        meta = ckpt / "meta.pt" if ckpt.is_dir() else ckpt  # FSDP2 (ModelParallelStrategy): a DCP directory
        if not meta.is_file():
            continue
        states = torch.load(meta, map_location="cpu", mmap=True, weights_only=False).get("callbacks", {})
        for state in states.values():
            if isinstance(state, Mapping) and state.get("format") == _FORMAT and "dcp" in state:
                named.add(Path(state["dcp"]).name)
    unnamed = [
        p
        for p in sorted(sharded_dir.iterdir() if sharded_dir.is_dir() else [])
        if p.is_dir() and _SHARDED_NAME.fullmatch(p.name) and p.name not in named
    ]
    if not dry_run:
        for path in unnamed:
            shutil.rmtree(path)
    return unnamed
