"""What both Lightning callbacks share: option checks, building the average, the update rule, evaluation swaps.

Lightning's hooks become ``update()`` and ``swapped()`` calls here; the checkpoint hooks come from
:class:`emakit._lightning.checkpoints._CheckpointingCallback`. :mod:`emakit.lightning` holds the
two public callbacks, which supply what the average is.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .. import migrate
from ..ema import EMA
from ..power import PowerEMA
from .checkpoints import _CheckpointingCallback, _PeerAverage
from .pl import extract_batch_size, pl

TIMES = ("steps", "samples")
STAGES = ("validate", "test", "predict")
CHECKPOINT_WEIGHTS = ("raw", "averaged")


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def _check_arguments(
    owner: str,
    *,
    time: str,
    averaged_in: Iterable[str],
    checkpoint_weights: str,
    batch_size: Callable[[Any], int] | None,
    every_n_steps: int,
    restart_average: bool,
) -> tuple[str, ...]:
    """The callbacks' own argument checks (raising naming ``owner``); returns ``averaged_in`` as a tuple."""
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise ValueError(
            f"{owner}: every_n_steps must be an int >= 1 (optimizer steps per update), got "
            f"every_n_steps={every_n_steps!r}"
        )
    if not isinstance(restart_average, bool):
        raise TypeError(f"{owner}: restart_average must be True or False, got restart_average={restart_average!r}")
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
    return averaged_in


class _AveragingCallback(_CheckpointingCallback):
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
        every_n_steps: int = 1,
        restart_average: bool = False,
    ) -> None:
        owner = type(self).__name__
        averaged_in = _check_arguments(
            owner,
            time=time,
            averaged_in=averaged_in,
            checkpoint_weights=checkpoint_weights,
            batch_size=batch_size,
            every_n_steps=every_n_steps,
            restart_average=restart_average,
        )
        self._owner = owner
        self._kwargs = averager_kwargs
        self.time = time
        self.averaged_in = averaged_in
        self.checkpoint_weights = checkpoint_weights
        self._batch_size = batch_size
        self._sharded_dir = sharded_dir
        self.every_n_steps = every_n_steps
        self.restart_average = restart_average
        #: The average (built when fitting starts; None before).
        self.ema: EMA | PowerEMA | None = None
        self._module: nn.Module | None = None
        self._trainer: pl.Trainer | None = None
        self._pending: Mapping[str, Any] | None = None  # a loaded state waiting for the average to exist
        self._hooks: list[Any] = []
        self._steps_taken = 0  # optimizer steps that ran since the last update (post-step hooks)
        self._last_global_step = 0
        self._pending_samples = 0  # this rank's samples since the last optimizer step
        self._interval_steps = 0  # optimizer steps taken since the last update (every_n_steps)
        self._interval_dt: float = 0  # the time they make (steps, or samples over all ranks)
        self._peer: tuple[_PeerAverage, Mapping[str, Any]] | None = None  # a WeightAveraging average to import
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
        elif self._peer is not None:
            self._import_peer_average()

    def _build_for_evaluation(self, pl_module: pl.LightningModule) -> None:
        """validate/test/predict from a checkpoint with this callback's state: build the average to use it."""
        waiting = self._pending is not None or self._peer is not None
        if waiting and (self.ema is None or self._module is not pl_module):
            self._make(pl_module)

    # ------------------------------------------------------------------ a Lightning WeightAveraging checkpoint

    def _peer_average_problem(self) -> str | None:
        """Why this callback cannot continue a WeightAveraging average (None: it can)."""
        if self.time == "samples":
            return (
                "that average's time is optimizer steps, and this callback counts samples (time='samples'), so the "
                "samples it was built over are unknown: resume with time='steps' to continue it"
            )
        return None

    def _check_peer_average(self, peer: _PeerAverage) -> None:
        problem = None if self.restart_average else self._peer_average_problem()
        if problem is not None:
            raise ValueError(
                f"{self._owner}: the checkpoint was written with Lightning's {peer.callback} (global_step="
                f"{peer.step}: its average after {peer.n_averaged} update(s) under 'state_dict', the training weights "
                f"under 'current_model_state') and holds no state for {self.state_key}; {problem}. Or pass "
                f"restart_average=True to start this average from the training weights (t=0)"
            )

    def _adopt_peer_average(self, peer: _PeerAverage, checkpoint: Mapping[str, Any]) -> None:
        """The model holds the training weights now; take the average over when it exists."""
        self._peer = (peer, checkpoint)
        if self.ema is not None:  # strategies that restore after setup (on_fit_start built it already)
            self._make(self._module)

    def _import_peer_average(self) -> None:
        (peer, checkpoint), self._peer = self._peer, None
        if self.restart_average:
            what = f"starts from the training weights at t=0 (restart_average=True), not from {peer.callback}'s"
        elif peer.n_averaged == 0:
            # Lightning had not averaged yet: its 'average' is the copy it made when fitting started.
            self.ema.t = peer.step
            what = f"starts from the training weights at t={peer.step} ({peer.callback} had not averaged yet)"
        else:
            migrate.load(self.ema, checkpoint, source="lightning", t=peer.step)
            what = f"continues {peer.callback}'s average (t={peer.step}) from the training weights"
        pl.utilities.rank_zero_info(f"{self._owner}: a checkpoint of Lightning's {peer.callback}: the average {what}")

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
            self._interval_steps += self._steps_taken
            self._interval_dt += dt
        if self._interval_steps >= self.every_n_steps:
            # every_n_steps=N: one update per N optimizer steps, over the time they make (dt=N steps).
            t_before = self.ema.t
            self.ema.update(dt=self._interval_dt)
            self._after_update(trainer, t_before)
            self._interval_steps, self._interval_dt = 0, 0
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
        self._peer = None  # a WeightAveraging average belongs to the fit that loaded it
