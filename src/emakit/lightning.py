"""Lightning callbacks: an :class:`emakit.EMA` or :class:`emakit.PowerEMA` of the LightningModule being trained.

A thin adapter: the averaging, swapping and checkpoint formats are the library's; this module
translates Lightning's hooks into ``update()``, ``swapped()`` and ``state_dict()`` calls::

    from emakit.lightning import EMACallback

    trainer = lightning.Trainer(callbacks=[EMACallback(decay=0.999)])
    trainer.fit(model)          # validation, test and predict run with the averaged weights

What it does, hook by hook (details in ``docs/lightning.md``):

- **Built when fitting starts** (``on_fit_start``), on the LightningModule as the strategy set it
  up: after DDP wrapping, after ``configure_model`` and FSDP2 sharding (the averages of a
  sharded model are shard-local DTensors), after precision casts.
- **Updated once per optimizer step that ran.** A post-step hook on each optimizer counts the
  steps that really happened; ``on_train_batch_end`` updates when the count moved. Gradient
  accumulation gives one update per optimizer step, and a step that ``GradScaler`` skipped
  (fp16 overflow) gives none — ``trainer.global_step`` counts that step anyway, so it cannot
  tell. A skipped step did not happen: no update, and time does not advance.
- **Time** in optimizer steps (``time="steps"``, ``dt`` = steps taken) or in samples
  (``time="samples"``, ``dt`` = global batch size over the step: local batch sizes summed over
  the accumulated batches, then over the ranks, one all-reduce of one integer per step).
- **Evaluation** (``averaged_in``): validation, test and predict run inside ``swapped()``.
- **Checkpoints**: the callback state holds ``ema.state_dict()`` when the average is replicated
  (one process, DDP). A sharded average (FSDP2, ``shard=True``) is written by every rank with
  ``ema.save()`` into a DCP directory beside the checkpoints, which the callback state names:
  Lightning writes callback state from rank 0 only, which would lose the other ranks' shards.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.data import extract_batch_size
except ImportError:  # the standalone package, same API
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from pytorch_lightning.utilities.data import extract_batch_size  # type: ignore[no-redef]
    except ImportError:
        raise ImportError("emakit.lightning needs Lightning 2.2 or newer: pip install 'emakit[lightning]'") from None

import torch
from torch import nn

from . import schedules, snapshots
from .ema import EMA
from .power import PowerEMA

__all__ = ["EMACallback", "PowerEMACallback", "prune_sharded_averages"]

if tuple(int(p) for p in pl.__version__.split(".")[:2] if p.isdigit()) < (2, 2):
    raise ImportError(
        f"emakit.lightning needs Lightning 2.2 or newer, found {pl.__version__}: pip install 'emakit[lightning]'"
    )

TIMES = ("steps", "samples")
STAGES = ("validate", "test", "predict")
CHECKPOINT_WEIGHTS = ("raw", "averaged")
#: Checkpoint key of the training weights when ``checkpoint_weights="averaged"`` puts the average under ``state_dict``.
RAW_STATE_DICT_KEY = "emakit_raw_state_dict"
_FORMAT = "emakit.lightning"
_VERSION = 1
_SHARDED_NAME = re.compile(r"(ema|powerema)-step=\d+-[0-9a-f]{8}")


def _plain(name: str) -> str:
    """A state-dict key without ``_orig_mod`` parts (``torch.compile``), as the averages name it."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def _stable_repr(obj: Any) -> str:
    """``repr(obj)``, or its qualified name when the repr holds a memory address (differs between runs)."""
    text = repr(obj)
    if " at 0x" in text:
        text = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"
    return text


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


class _AveragingCallback(pl.Callback):
    """What both callbacks share: building, the update rule, swaps, checkpoints."""

    def __init__(
        self,
        averager_kwargs: dict[str, Any],
        *,
        time: str,
        averaged_in: Iterable[str],
        checkpoint_weights: str,
        batch_size: Callable[[Any], int] | None,
        sharded_dir: str | os.PathLike | None,
    ) -> None:
        owner = type(self).__name__
        if time not in TIMES:
            raise ValueError(f"{owner}: time must be one of {TIMES}, got time={time!r}")
        if isinstance(averaged_in, str):
            averaged_in = (averaged_in,)
        averaged_in = tuple(averaged_in)
        unknown = [s for s in averaged_in if s not in STAGES]
        if unknown:
            raise ValueError(f"{owner}: averaged_in must hold stages among {STAGES}, got averaged_in={averaged_in!r}")
        if checkpoint_weights not in CHECKPOINT_WEIGHTS:
            raise ValueError(
                f"{owner}: checkpoint_weights must be one of {CHECKPOINT_WEIGHTS}, got "
                f"checkpoint_weights={checkpoint_weights!r}"
            )
        if batch_size is not None and not callable(batch_size):
            raise TypeError(f"{owner}: batch_size must be a callable batch -> int, got batch_size={batch_size!r}")
        if batch_size is not None and time != "samples":
            raise ValueError(f"{owner}: batch_size= counts samples; it needs time='samples', got time={time!r}")
        self._owner = owner
        self._kwargs = averager_kwargs
        self.time = time
        self.averaged_in = averaged_in
        self.checkpoint_weights = checkpoint_weights
        self._batch_size = batch_size
        self._sharded_dir = sharded_dir
        #: The average (built when fitting starts; None before).
        self.ema: EMA | PowerEMA | None = None
        self._module: nn.Module | None = None
        self._trainer: pl.Trainer | None = None
        self._pending: Mapping[str, Any] | None = None  # a loaded state waiting for the average to exist
        self._hooks: list[Any] = []
        self._steps_taken = 0  # optimizer steps that ran since the last update (post-step hooks)
        self._last_global_step = 0
        self._pending_samples = 0  # this rank's samples since the last optimizer step
        self._swap = contextlib.ExitStack()

    # ------------------------------------------------------------------ what subclasses supply

    def _build(self, module: nn.Module) -> EMA | PowerEMA:
        raise NotImplementedError

    def _swapped(self):
        raise NotImplementedError

    def _averaged_state_dict(self, full: bool) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _after_update(self, trainer: pl.Trainer, t_before: float) -> None:
        """Called after every update (PowerEMACallback saves snapshots here)."""

    def _key(self) -> dict[str, Any]:
        """What tells two such callbacks apart in a checkpoint (stable across processes)."""
        raise NotImplementedError

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self._key(), time=self.time)

    # ------------------------------------------------------------------ building

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Another fit() of the same module continues the average; a new module gets a new one.
        if self.ema is None or self._module is not pl_module:
            self._make(pl_module)
        if self.checkpoint_weights == "averaged" and any(_is_dtensor(p) for p in pl_module.parameters()):
            raise ValueError(
                f"{self._owner}: checkpoint_weights='averaged' needs a model whose checkpoint holds plain tensors "
                f"(one process, DDP); this model is sharded (FSDP2), so Lightning writes its weights with DCP and "
                f"the raw weights could not be kept beside them. Use checkpoint_weights='raw' and export the "
                f"average with callback.ema.averaged_state_dict(full=True)"
            )
        writers = [
            c.state_key
            for c in trainer.callbacks
            if isinstance(c, _AveragingCallback) and c.checkpoint_weights == "averaged"
        ]
        if len(writers) > 1:
            raise ValueError(
                f"{self._owner}: only one callback may write its average as the checkpoint's state_dict, got "
                f"checkpoint_weights='averaged' on {writers}"
            )

    def _make(self, pl_module: nn.Module) -> None:
        self.ema = self._build(pl_module)
        self._module = pl_module
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._restore(pending)

    def _build_for_evaluation(self, pl_module: pl.LightningModule) -> None:
        """validate/test/predict from a checkpoint with this callback's state: build the average to use it."""
        if self._pending is not None and (self.ema is None or self._module is not pl_module):
            self._make(pl_module)

    # ------------------------------------------------------------------ updates

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        for optimizer in trainer.optimizers:
            optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the real one
            self._hooks.append(optimizer.register_step_post_hook(self._stepped))
        self._steps_taken = 0
        self._last_global_step = trainer.global_step

    def _stepped(self, optimizer, args, kwargs) -> None:
        self._steps_taken += 1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        if self.time == "samples":
            self._pending_samples += int(self._count(batch))
        if trainer.global_step == self._last_global_step and not self._steps_taken:
            return  # accumulating gradients: no optimizer step after this batch
        # An optimizer step was attempted (global_step moved on every rank alike) or ran.
        dt: float = self._steps_taken
        if self.time == "samples":
            # One integer all-reduce per optimizer step (a host synchronisation), on every rank.
            local = torch.tensor(self._pending_samples, dtype=torch.int64, device=trainer.strategy.root_device)
            dt = int(trainer.strategy.reduce(local, reduce_op="sum").item())
        if self._steps_taken and dt > 0:
            t_before = self.ema.t
            self.ema.update(dt=dt)
            self._after_update(trainer, t_before)
        # A skipped step (GradScaler found inf/NaN) did not happen: its samples are not counted.
        self._steps_taken = 0
        self._pending_samples = 0
        self._last_global_step = trainer.global_step

    def _count(self, batch: Any) -> int:
        return self._batch_size(batch) if self._batch_size is not None else extract_batch_size(batch)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ------------------------------------------------------------------ evaluation with the average

    def _enter(self, stage: str, pl_module: pl.LightningModule) -> None:
        self._build_for_evaluation(pl_module)
        if stage in self.averaged_in and self.ema is not None:
            self._swap.close()  # never nested
            self._swap.enter_context(self._swapped())

    def on_validation_start(self, trainer, pl_module):
        self._enter("validate", pl_module)

    def on_validation_end(self, trainer, pl_module):
        self._swap.close()

    def on_test_start(self, trainer, pl_module):
        self._enter("test", pl_module)

    def on_test_end(self, trainer, pl_module):
        self._swap.close()

    def on_predict_start(self, trainer, pl_module):
        self._enter("predict", pl_module)

    def on_predict_end(self, trainer, pl_module):
        self._swap.close()

    def on_exception(self, trainer, pl_module, exception):
        self._swap.close()  # the model gets its own weights back
        self._remove_hooks()

    def teardown(self, trainer, pl_module, stage):
        self._swap.close()
        self._remove_hooks()

    # ------------------------------------------------------------------ checkpoints

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


class EMACallback(_AveragingCallback):
    """Lightning callback: an :class:`emakit.EMA` of the LightningModule, ``ema = decay * ema + (1 - decay) * weights``.

    Updated after every optimizer step that ran (gradient accumulation: once per step; a
    step skipped by fp16 ``GradScaler``: no update, no time). Validation, test and predict
    run with the averaged weights. The average resumes exactly from Lightning checkpoints.

    Args:
        decay, schedule, buffers, include, dtype, device, skip_nonfinite, locate_nonfinite,
            shard: as in :class:`emakit.EMA` (``schedule(t, dt)`` sees the time below).
        time: ``"steps"`` (default): ``t`` counts optimizer steps taken; ``"samples"``: ``t``
            counts training samples over all ranks (for half-lives in images).
        averaged_in: stages that run with the averaged weights, among ``"validate"``,
            ``"test"``, ``"predict"`` (default: all three; ``()`` for none).
        checkpoint_weights: ``"raw"`` (default) keeps the training weights under the
            checkpoint's ``state_dict``; ``"averaged"`` puts the average there, for deployment
            (``LightningModule.load_from_checkpoint`` then loads the average) and keeps the
            training weights under ``"emakit_raw_state_dict"``, from which resuming restores
            them. One process and DDP only.
        batch_size: ``batch -> int``, the samples in one local batch (``time="samples"``);
            default: Lightning's ``extract_batch_size`` (the first tensor's length).
        sharded_dir: where a sharded average writes its DCP directories at each checkpoint
            (default: ``<checkpoint dirpath>/emakit``).

    The average is ``callback.ema`` (built when fitting starts).

    Example::

        from emakit import schedules
        from emakit.lightning import EMACallback

        ema = EMACallback(schedule=schedules.halflife(500_000), time="samples")
        trainer = lightning.Trainer(callbacks=[ema], accumulate_grad_batches=4)
        trainer.fit(model, datamodule)
        torch.save(ema.ema.averaged_state_dict(), "model_ema.pt")
    """

    def __init__(
        self,
        decay: float | None = None,
        *,
        schedule: Callable[[float, float], float] | None = None,
        buffers: str = "average",
        include: Callable[[str], bool] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        skip_nonfinite: bool = False,
        locate_nonfinite: bool = False,
        shard: Any = False,
        time: str = "steps",
        averaged_in: Iterable[str] = STAGES,
        checkpoint_weights: str = "raw",
        batch_size: Callable[[Any], int] | None = None,
        sharded_dir: str | os.PathLike | None = None,
    ) -> None:
        if decay is not None and schedule is not None:
            raise ValueError(f"EMACallback: give decay or schedule, not both; got decay={decay}, schedule={schedule!r}")
        if decay is None and schedule is None:
            raise ValueError("EMACallback: give decay (e.g. decay=0.999) or schedule (e.g. schedules.halflife(2000))")
        if decay is not None:
            schedule = schedules.constant(decay)  # checks decay now, not when fitting starts
        kwargs = dict(schedule=schedule, buffers=buffers, include=include, dtype=dtype, device=device)
        kwargs.update(skip_nonfinite=skip_nonfinite, locate_nonfinite=locate_nonfinite, shard=shard)
        super().__init__(
            kwargs,
            time=time,
            averaged_in=averaged_in,
            checkpoint_weights=checkpoint_weights,
            batch_size=batch_size,
            sharded_dir=sharded_dir,
        )

    def _key(self) -> dict[str, Any]:
        return {"schedule": _stable_repr(self._kwargs["schedule"])}

    def _build(self, module: nn.Module) -> EMA:
        return EMA(module, **self._kwargs)

    def _swapped(self):
        return self.ema.swapped()

    def _averaged_state_dict(self, full: bool) -> dict[str, torch.Tensor]:
        return self.ema.averaged_state_dict(full=full)


class PowerEMACallback(_AveragingCallback):
    """Lightning callback: a :class:`emakit.PowerEMA` of the LightningModule, with snapshots for post-hoc EMA.

    Each profile is ``decay = (1 - dt / t) ** (gamma + 1)`` (EDM2); every ``snapshot_every``
    units of time all profiles are saved to ``snapshot_dir`` with
    :meth:`emakit.PowerEMA.save_snapshot` (collective when sharded), for
    :func:`emakit.posthoc.reconstruct` after training. Updates, time, checkpoints and resume
    work as in :class:`EMACallback`.

    Args:
        sigma_rels: relative widths of the tracked profiles (default ``(0.05, 0.10)``).
        gammas: the profiles' exponents instead.
        snapshot_every: save snapshots each time ``t`` reaches a multiple of this (in the
            unit of ``time``: steps or samples); ``None``: no snapshots.
        snapshot_dir: where (default ``<trainer.default_root_dir>/phema``).
        evaluate_sigma_rel: the profile swapped in for validation/test/predict and written by
            ``checkpoint_weights="averaged"``. ``None`` (default): evaluation uses the raw
            weights (``averaged_in`` defaults to none).
        buffers, include, dtype, device, skip_nonfinite, locate_nonfinite, shard: as in
            :class:`emakit.PowerEMA`.
        time, averaged_in, checkpoint_weights, batch_size, sharded_dir: as in :class:`EMACallback`.

    Example::

        from emakit.lightning import PowerEMACallback

        pema = PowerEMACallback(sigma_rels=(0.05, 0.10), snapshot_every=5000, snapshot_dir="run/phema")
        lightning.Trainer(callbacks=[pema]).fit(model)
        sd = emakit.posthoc.reconstruct("run/phema", sigma_rel=0.08)
    """

    def __init__(
        self,
        sigma_rels: Iterable[float] | None = None,
        *,
        gammas: Iterable[float] | None = None,
        snapshot_every: float | None = None,
        snapshot_dir: str | os.PathLike | None = None,
        evaluate_sigma_rel: float | None = None,
        buffers: str = "average",
        include: Callable[[str], bool] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        skip_nonfinite: bool = False,
        locate_nonfinite: bool = False,
        shard: Any = False,
        time: str = "steps",
        averaged_in: Iterable[str] | None = None,
        checkpoint_weights: str = "raw",
        batch_size: Callable[[Any], int] | None = None,
        sharded_dir: str | os.PathLike | None = None,
    ) -> None:
        if snapshot_every is not None and (
            isinstance(snapshot_every, bool)
            or not isinstance(snapshot_every, (int, float))
            or not snapshot_every > 0
            or math.isinf(snapshot_every)
        ):
            raise ValueError(f"PowerEMACallback: snapshot_every must be a finite number > 0, got {snapshot_every!r}")
        if averaged_in is None:
            averaged_in = STAGES if evaluate_sigma_rel is not None else ()
        elif tuple(averaged_in) and evaluate_sigma_rel is None:
            raise ValueError(
                f"PowerEMACallback: averaged_in={tuple(averaged_in)!r} needs evaluate_sigma_rel= (which profile to "
                f"evaluate), got evaluate_sigma_rel=None"
            )
        if checkpoint_weights == "averaged" and evaluate_sigma_rel is None:
            raise ValueError(
                "PowerEMACallback: checkpoint_weights='averaged' needs evaluate_sigma_rel= (which profile to write), "
                "got evaluate_sigma_rel=None"
            )
        if sigma_rels is not None:
            sigma_rels = tuple(sigma_rels)
            if evaluate_sigma_rel is not None and not any(
                math.isclose(s, evaluate_sigma_rel, rel_tol=1e-6) for s in sigma_rels
            ):
                raise ValueError(
                    f"PowerEMACallback: evaluate_sigma_rel must be one of sigma_rels={sigma_rels}, "
                    f"got evaluate_sigma_rel={evaluate_sigma_rel}"
                )
        kwargs = dict(sigma_rels=sigma_rels, gammas=None if gammas is None else tuple(gammas), buffers=buffers)
        kwargs.update(include=include, dtype=dtype, device=device, skip_nonfinite=skip_nonfinite)
        kwargs.update(locate_nonfinite=locate_nonfinite, shard=shard)
        super().__init__(
            kwargs,
            time=time,
            averaged_in=averaged_in,
            checkpoint_weights=checkpoint_weights,
            batch_size=batch_size,
            sharded_dir=sharded_dir,
        )
        self.snapshot_every = snapshot_every
        self.snapshot_dir = snapshot_dir
        self.evaluate_sigma_rel = evaluate_sigma_rel

    def _key(self) -> dict[str, Any]:
        if self._kwargs["gammas"] is not None:
            return {"gammas": self._kwargs["gammas"]}
        return {"sigma_rels": self._kwargs["sigma_rels"] or (0.05, 0.10)}

    def _build(self, module: nn.Module) -> PowerEMA:
        return PowerEMA(module, **self._kwargs)

    def _swapped(self):
        return self.ema.swapped(self.evaluate_sigma_rel)

    def _averaged_state_dict(self, full: bool) -> dict[str, torch.Tensor]:
        return self.ema.averaged_state_dict(self.evaluate_sigma_rel, full=full)

    def _snapshot_dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.snapshot_dir or Path(trainer.default_root_dir) / "phema")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        directory = self._snapshot_dir(trainer)
        if self.snapshot_every is None or not directory.is_dir():
            return
        # Snapshots after the current time belong to another trajectory: an earlier run in this
        # directory, or the run interrupted after the checkpoint this one resumes from. Mixing
        # them would corrupt post-hoc reconstruction, and a snapshot is never overwritten.
        later = [p.name for p in snapshots.snapshot_paths(directory) if snapshots.read_info(p).t > self.ema.t]
        if later:
            raise ValueError(
                f"PowerEMACallback: snapshot_dir={str(directory)!r} already holds {len(later)} snapshot(s) after "
                f"t={self.ema.t} ({later[0]}, ...), from another run or from the run interrupted after this "
                f"checkpoint; move or delete them before training from here"
            )

    def _after_update(self, trainer: pl.Trainer, t_before: float) -> None:
        every = self.snapshot_every
        if every is not None and math.floor(self.ema.t / every) > math.floor(t_before / every):
            self.ema.save_snapshot(self._snapshot_dir(trainer))  # collective when sharded


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
