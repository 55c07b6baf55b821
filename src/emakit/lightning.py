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
  ``every_n_steps=N``: one update per ``N`` steps taken, over the time they make (``dt = N``).
- **Time** in optimizer steps (``time="steps"``, ``dt`` = steps taken) or in samples
  (``time="samples"``, ``dt`` = global batch size over the step: local batch sizes summed over
  the accumulated batches, then over the ranks, one all-reduce of one integer per step).
- **Evaluation** (``averaged_in``): validation, test and predict run inside ``swapped()``.
- **Checkpoints**: the callback state holds ``ema.state_dict()`` when the average is replicated
  (one process, DDP). A sharded average (FSDP2, ``shard=True``) is written by every rank with
  ``ema.save()`` into a DCP directory beside the checkpoints, which the callback state names:
  Lightning writes callback state from rank 0 only, which would lose the other ranks' shards.
- **A checkpoint of Lightning's ``EMAWeightAveraging``** (the average under ``state_dict``): the
  model gets the training weights (``current_model_state``) and ``EMACallback`` imports the
  average at ``t = global_step``; what cannot be continued raises before training starts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import schedules, snapshots
from ._engine.options import Options, takes_options
from ._lightning.callback import CHECKPOINT_WEIGHTS, STAGES, TIMES, _AveragingCallback  # noqa: F401 (importable here)
from ._lightning.checkpoints import RAW_STATE_DICT_KEY, prune_sharded_averages  # noqa: F401 (public here)
from ._lightning.pl import pl
from .ema import EMA
from .power import PowerEMA

__all__ = ["EMACallback", "PowerEMACallback", "prune_sharded_averages"]


def _stable_repr(obj: Any) -> str:
    """``repr(obj)``, or its qualified name when the repr holds a memory address (differs between runs)."""
    text = repr(obj)
    if " at 0x" in text:
        text = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"
    return text


@takes_options
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
        every_n_steps: update once per this many optimizer steps taken, over the time they make
            (``dt = every_n_steps`` with ``time="steps"``): the same decay per unit of time as
            updating every step, for a fraction of the passes over the weights. Between
            updates the average stays where the last one left it.
        restart_average: what to do with a checkpoint written by Lightning's ``WeightAveraging``
            / ``EMAWeightAveraging`` (the average under ``state_dict``, the training weights under
            ``current_model_state``). ``False`` (default): the model gets the training weights,
            and the average and its time (``global_step``) are imported, so training continues
            as if the run had used this callback from the start; where that is impossible
            (``time="samples"``) an error says so before training starts. ``True``: the model
            gets the training weights, and the average starts from them at ``t = 0``.

    The average is ``callback.ema`` (built when fitting starts).

    Switching a running ``EMAWeightAveraging(decay=d, update_every_n_steps=k,
    update_starting_at_step=s)`` job: ``trainer.fit(model, ckpt_path=its_checkpoint)`` with
    ``EMACallback(schedule=emakit.migrate.schedule("lightning", decay=d, update_every_n_steps=k,
    update_starting_at_step=s))`` gives Lightning's numbers from there on (``docs/lightning.md``).

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
        time: str = "steps",
        averaged_in: Iterable[str] = STAGES,
        checkpoint_weights: str = "raw",
        batch_size: Callable[[Any], int] | None = None,
        sharded_dir: str | os.PathLike | None = None,
        every_n_steps: int = 1,
        restart_average: bool = False,
        **options: Any,
    ) -> None:
        if decay is not None and schedule is not None:
            raise ValueError(f"EMACallback: give decay or schedule, not both; got decay={decay}, schedule={schedule!r}")
        if decay is None and schedule is None:
            raise ValueError("EMACallback: give decay (e.g. decay=0.999) or schedule (e.g. schedules.halflife(2000))")
        if decay is not None:
            schedule = schedules.constant(decay)  # checks decay now, not when fitting starts
        kwargs = dict(schedule=schedule, **Options.parse("EMACallback", options).as_kwargs())
        super().__init__(
            kwargs,
            time=time,
            averaged_in=averaged_in,
            checkpoint_weights=checkpoint_weights,
            batch_size=batch_size,
            sharded_dir=sharded_dir,
            every_n_steps=every_n_steps,
            restart_average=restart_average,
        )

    def _key(self) -> dict[str, Any]:
        return {"schedule": _stable_repr(self._kwargs["schedule"])}

    def _build(self, module: nn.Module) -> EMA:
        return EMA(module, **self._kwargs)

    def _swapped(self):
        return self.ema.swapped()

    def _averaged_state_dict(self, full: bool) -> dict[str, torch.Tensor]:
        return self.ema.averaged_state_dict(full=full)


def _power_options(
    sigma_rels: Iterable[float] | None,
    *,
    snapshot_every: float | None,
    evaluate_sigma_rel: float | None,
    averaged_in: Iterable[str] | None,
    checkpoint_weights: str,
) -> tuple[tuple[float, ...] | None, Iterable[str]]:
    """:class:`PowerEMACallback`'s own option checks; returns ``(sigma_rels, averaged_in)`` as it uses them."""
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
    return sigma_rels, averaged_in


@takes_options
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
        time, averaged_in, checkpoint_weights, batch_size, sharded_dir, every_n_steps: as in
            :class:`EMACallback`.
        restart_average: a checkpoint of Lightning's ``WeightAveraging`` holds one average,
            from which no power profile can be recovered: ``False`` (default) raises before
            training starts; ``True`` restores the training weights and starts the profiles
            from them at ``t = 0``.

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
        time: str = "steps",
        averaged_in: Iterable[str] | None = None,
        checkpoint_weights: str = "raw",
        batch_size: Callable[[Any], int] | None = None,
        sharded_dir: str | os.PathLike | None = None,
        every_n_steps: int = 1,
        restart_average: bool = False,
        **options: Any,
    ) -> None:
        sigma_rels, averaged_in = _power_options(
            sigma_rels,
            snapshot_every=snapshot_every,
            evaluate_sigma_rel=evaluate_sigma_rel,
            averaged_in=averaged_in,
            checkpoint_weights=checkpoint_weights,
        )
        kwargs = dict(sigma_rels=sigma_rels, gammas=None if gammas is None else tuple(gammas))
        kwargs.update(Options.parse("PowerEMACallback", options).as_kwargs())
        super().__init__(
            kwargs,
            time=time,
            averaged_in=averaged_in,
            checkpoint_weights=checkpoint_weights,
            batch_size=batch_size,
            sharded_dir=sharded_dir,
            every_n_steps=every_n_steps,
            restart_average=restart_average,
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

    def _peer_average_problem(self) -> str:
        return (
            "the power profiles cannot be recovered from one exponential average: resume with "
            "EMACallback(schedule=emakit.migrate.schedule('lightning', decay=...)) to continue it"
        )

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

