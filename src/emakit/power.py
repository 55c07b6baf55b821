"""``PowerEMA``: several power-function EMAs of one model, tracked in one pass, with snapshots."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed, schedules, snapshots
from ._engine.averager import _Averager, outside_compiled_graphs
from ._engine.model import normalize_name
from ._engine.nonfinite import NonFiniteError
from ._engine.options import Options, takes_options

__all__ = ["PowerEMA"]

_SNAPSHOT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@takes_options
class PowerEMA(_Averager):
    """Power-function EMAs (Karras et al., EDM2) of a model, for post-hoc EMA reconstruction.

    Each profile ``j`` is an EMA with ``decay = (1 - dt / t) ** (gamma_j + 1)``: the average
    at time ``t`` weights the training trajectory by ``tau ** gamma_j`` on ``[0, t]``, a fixed
    fraction of the run whatever its length. Track two (EDM2: ``sigma_rel`` 0.05 and 0.10),
    save :meth:`save_snapshot` every so often, and after training
    :func:`emakit.posthoc.reconstruct` builds the EMA of *any* length from the snapshots.

    All profiles are updated in one pass: each chunk of weights is read from memory once and
    from cache for every further profile. What is averaged, precision, placement, names,
    frozen parameters and resume work as in :class:`emakit.EMA`.

    Args:
        model: the module whose weights are averaged (not copied).
        sigma_rels: relative widths of the tracked profiles, each in ``(0, 0.2887)``;
            default ``(0.05, 0.10)``. Give this or ``gammas``.
        gammas: the profiles' exponents instead (each ``> -1``).
        buffers, include, dtype, device, skip_nonfinite, locate_nonfinite, shard: as in
            :class:`emakit.EMA`.

    Example::

        pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10))
        for step in range(1, steps + 1):
            train_step()
            pema.update()
            if step % 1000 == 0:
                pema.save_snapshot("run/phema")
        sd = emakit.posthoc.reconstruct("run/phema", sigma_rel=0.08)
    """

    _format = "emakit.PowerEMA"

    def __init__(
        self,
        model: nn.Module,
        sigma_rels: Sequence[float] | None = None,
        *,
        gammas: Sequence[float] | None = None,
        **options: Any,
    ) -> None:
        options = Options.parse("PowerEMA", options)
        if sigma_rels is not None and gammas is not None:
            raise ValueError(
                f"PowerEMA: give sigma_rels or gammas, not both; got sigma_rels={sigma_rels}, gammas={gammas}"
            )
        if gammas is None:
            values = (0.05, 0.10) if sigma_rels is None else sigma_rels
            label = "sigma_rels"
        else:
            values, label = gammas, "gammas"
        if isinstance(values, (int, float)) or not isinstance(values, Sequence) or len(values) == 0:
            raise ValueError(f"PowerEMA: {label} must be a non-empty sequence of numbers, got {label}={values!r}")
        if label == "sigma_rels":
            profiles = [schedules.power(sigma_rel=s) for s in values]
        else:
            profiles = [schedules.power(gamma=g) for g in values]
        if len({p.gamma for p in profiles}) != len(profiles):
            raise ValueError(f"PowerEMA: {label} must be distinct, got {label}={list(values)}")
        super().__init__(model, profiles, options)

    @property
    def gammas(self) -> tuple[float, ...]:
        """Exponents of the tracked profiles."""
        return tuple(s.gamma for s in self._schedules)

    @property
    def sigma_rels(self) -> tuple[float, ...]:
        """Relative widths of the tracked profiles."""
        return tuple(s.sigma_rel for s in self._schedules)

    @property
    def decay(self) -> tuple[float, ...] | None:
        """Each profile's decay in the last :meth:`update`, as it returned them (see :attr:`emakit.EMA.decay`)."""
        return None if self._last_decays is None else tuple(self._last_decays)

    def __repr__(self) -> str:
        numel = self._storage.numel
        profiles = ", ".join(f"{s:.4g}" for s in self.sigma_rels)
        return (
            f"PowerEMA(sigma_rels=({profiles}), t={self.t}, num_updates={self.num_updates}, "
            f"averaged={len(self._spec.average)} tensors / {numel} elements per profile)"
        )

    @outside_compiled_graphs
    def update(self, model: nn.Module | None = None, *, t: float | None = None, dt: float | None = None) -> tuple:
        """Move every profile toward the model's current weights; returns their decays.

        Same time semantics as :meth:`emakit.EMA.update`: one unit by default, ``dt=k`` when
        updating every ``k`` steps, ``t=`` for absolute time (e.g. images seen). Exact for any
        sequence of ``dt``: the first update copies.
        """
        return tuple(self._advance(model, t, dt))

    def _index(self, where: str, sigma_rel: float | None) -> int:
        if sigma_rel is None:
            if len(self._schedules) == 1:
                return 0
            raise ValueError(
                f"PowerEMA.{where}: this PowerEMA tracks several profiles; pick one with sigma_rel= "
                f"(one of {', '.join(f'{s:.6g}' for s in self.sigma_rels)})"
            )
        for j, s in enumerate(self.sigma_rels):
            if math.isclose(s, sigma_rel, rel_tol=1e-6):
                return j
        raise ValueError(
            f"PowerEMA.{where}: sigma_rel={sigma_rel} is not tracked (tracked: "
            f"{', '.join(f'{s:.6g}' for s in self.sigma_rels)}); other lengths come from "
            f"emakit.posthoc.reconstruct on saved snapshots"
        )

    def averaged_state_dict(
        self, sigma_rel: float | None = None, *, dtype: str | torch.dtype = "model", full: bool = False
    ) -> dict[str, Tensor]:
        """The model's state dict with profile ``sigma_rel``'s averages (see :meth:`emakit.EMA.averaged_state_dict`)."""
        return self._averaged_state_dict(self._index("averaged_state_dict", sigma_rel), dtype, full)

    def averaged_module(self, sigma_rel: float | None = None) -> nn.Module:
        """Profile ``sigma_rel``'s averages as a module of the model's class (see :meth:`emakit.EMA.averaged_module`)."""
        return self._averaged_module(self._index("averaged_module", sigma_rel))

    def swapped(
        self,
        sigma_rel: float | None = None,
        model: nn.Module | None = None,
        *,
        backup_device: torch.device | str | None = None,
    ):
        """Context manager: the model holds profile ``sigma_rel``'s averages inside (see :meth:`emakit.EMA.swapped`)."""
        return self._swap(model, self._index("swapped", sigma_rel), backup_device)

    def copy_to(self, model: nn.Module | None = None, *, sigma_rel: float | None = None) -> None:
        """Write profile ``sigma_rel``'s averages (and copied tensors) into ``model``."""
        self._copy_to(model, self._index("copy_to", sigma_rel))

    def _config(self) -> dict[str, Any]:
        return {"gammas": [float(g) for g in self.gammas], **super()._config()}

    def _check_config(self, where: str, stored: Mapping[str, Any]) -> None:
        # The averages are per profile: another set of profiles cannot be loaded into these.
        gammas = stored.get("gammas")
        if gammas is not None and (
            len(gammas) != len(self.gammas)
            or any(not math.isclose(a, b, rel_tol=1e-9) for a, b in zip(gammas, self.gammas))
        ):
            raise ValueError(
                f"{where}: the state dict tracks gammas={list(gammas)}, this PowerEMA "
                f"gammas={list(self.gammas)} (sigma_rels={list(self.sigma_rels)})"
            )
        super()._check_config(where, {k: v for k, v in stored.items() if k != "gammas"})

    def save_snapshot(
        self,
        directory: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.float32,
        static: bool = True,
        encoding: str = "fp32",
    ) -> Path:
        """Save every profile at the current time as ``<directory>/phema-<t>.safetensors``.

        The file is self-describing (time, each profile's ``sigma_rel`` and ``gamma``, names,
        dtypes) and written atomically. ``dtype`` is the storage precision of the averages:
        fp32 by default; fp16/bf16 halve the size but amplify reconstruction error (EDM2: at
        sigma_rel 0.03 the error grew from 6.8e-3 to 7.5e-2), so they warn. ``static=True``
        also stores the tensors read from the model (frozen parameters) so reconstruction
        returns complete state dicts; pass ``False`` for a large frozen backbone. Needs the
        ``safetensors`` extra. Nothing is saved at ``t = 0`` (that average is the initial
        model and carries no information for reconstruction).

        Distributed runs: with sharded averages (FSDP2, ZeRO-3, ``shard=True``) this is
        collective and writes ``<directory>/phema-<t>.shards``, each rank its own shards as
        safetensors, rank 0 a JSON index (nothing gathered, nothing pickled); replicated ones (DDP) are written by rank 0 alone, whichever
        ranks call it. Both kinds reconstruct alike (:func:`emakit.posthoc.reconstruct`).

        ``encoding="compact"`` (single-file, fp32 only) stores each average as an int16 delta
        against this PowerEMA's previous compact snapshot in the same directory, with a
        lossless fp32 keyframe every 32 snapshots and at the start of a chain (a new or resumed
        PowerEMA), each delta predicted from the other profiles' and its own last increments:
        about 0.45x the bytes of fp32 for about the same reconstruction error
        (``benchmarks/bench_storage.py``). Memory: two more fp32 copies of the averages, on
        the CPU. Keep every file back to the previous keyframe: a delta needs its reference
        (and its prediction the snapshot before that).
        """
        self._assert_not_swapped("save_snapshot")
        self._check_finite("save_snapshot", collective=self.is_sharded)
        self._check_snapshot_args(dtype, encoding)
        common = self._snapshot_fields(dtype, static)
        _check_extras_finite(self._owner, common, self.is_sharded)
        storage = self._storage
        if storage.is_sharded or any(distributed.is_dtensor(v) for v in common["static"].values()):
            # Collective: each rank writes its own shards, nothing is gathered.
            averages = [
                {n: v.to(dtype) if v.dtype != dtype else v for n, v in storage.state_tensors(k).items()}
                for k in range(self._num_profiles)
            ]
            shapes = {n: tuple(s) for n, s in storage.model_shapes().items()}
            shapes.update({n: tuple(v.shape) for n, v in {**storage.copies, **common["static"]}.items()})
            if encoding != "fp32":
                raise ValueError(f"PowerEMA.save_snapshot: sharded snapshots are fp32 only, got encoding={encoding!r}")
            return snapshots.write_sharded_snapshot(directory, averages=averages, model_shapes=shapes, **common)
        if distributed.rank() != 0:
            # Replicated (DDP): every rank holds the same averages; rank 0 writes them.
            return Path(directory) / snapshots.file_name(self.t)
        averages = [{n: v for n, v, _, _ in storage.tensors(k)} for k in range(self._num_profiles)]
        chain = None
        if encoding == "compact":
            chain = self.__dict__.setdefault("_delta_chain", snapshots.DeltaChain())  # never in state_dict
        return snapshots.write_snapshot(directory, averages=averages, chain=chain, **common)

    def _check_snapshot_args(self, dtype: torch.dtype, encoding: str) -> None:
        """Refuse a snapshot that cannot be saved; warn for fp16/bf16 (at save_snapshot's caller)."""
        if dtype not in _SNAPSHOT_DTYPES:
            raise ValueError(f"PowerEMA.save_snapshot: dtype must be one of {_SNAPSHOT_DTYPES}, got dtype={dtype!r}")
        if self.t <= 0:
            raise ValueError("PowerEMA.save_snapshot: nothing to save at t=0; call update() first")
        if encoding not in snapshots.ENCODINGS:
            raise ValueError(
                f"PowerEMA.save_snapshot: encoding must be one of {snapshots.ENCODINGS}, got encoding={encoding!r}"
            )
        if encoding == "compact" and dtype != torch.float32:
            raise ValueError(f"PowerEMA.save_snapshot: encoding='compact' stores float32 values, got dtype={dtype}")
        _refuse_complex(self._storage.groups, dtype)
        if dtype in (torch.float16, torch.bfloat16):
            warnings.warn(
                f"PowerEMA.save_snapshot: storing snapshots as {dtype} amplifies post-hoc reconstruction "
                f"error (the solve combines snapshots with large coefficients); float32 is the default",
                stacklevel=3,
            )

    def _snapshot_fields(self, dtype: torch.dtype, static: bool) -> dict[str, Any]:
        """Everything a snapshot holds besides the averages."""
        distributed.reshard(self._model)
        keys = [normalize_name(k) for k in self._model.state_dict()]  # the model's keys, in order
        live = {n: self._slots[n].get() for n in self._spec.live} if static else {}
        return dict(
            t=self.t,
            num_updates=self.num_updates,
            sigma_rels=list(self.sigma_rels),
            gammas=list(self.gammas),
            copies=dict(self._storage.copies),
            static=live,
            model_dtypes={n: g.source_dtype for g in self._storage.groups for n in g.names},
            dtype=dtype,
            keys=keys,
            aliases=dict(self._aliases),
        )


def _check_extras_finite(owner: str, common: dict[str, Any], sharded: bool) -> None:
    """Copied and frozen tensors hold no NaN or Inf either: reconstruction returns them as they are."""
    bad, collective = None, sharded
    for kind, tensors in (("copied", common["copies"]), ("frozen (static)", common["static"])):
        for name, value in tensors.items():
            collective = collective or distributed.is_dtensor(value)
            local = value.to_local() if distributed.is_dtensor(value) else value
            # a sum is NaN or Inf when an element is; one that overflowed is confirmed element by element
            if bad is None and local.is_floating_point() and not bool(torch.isfinite(local.sum())):
                bad = None if bool(torch.isfinite(local).all()) else f"the {kind} tensor {name!r}"
    if collective and distributed.any_rank(bad is not None) and bad is None:
        bad = "a copied or frozen tensor's shard on another rank"
    if bad is not None:
        raise NonFiniteError(
            f"{owner}.save_snapshot: {bad} holds NaN or Inf (it is copied, not averaged); nothing was "
            f"written. Find the step that made the model's weights non-finite"
        )


def _refuse_complex(groups, dtype: torch.dtype) -> None:
    """Snapshots store averages as real numbers: a complex average would lose its imaginary part."""
    names = [n for g in groups if g.buffer.is_complex() for n in g.names]
    if names:
        raise ValueError(
            f"PowerEMA.save_snapshot: snapshots store the averages as real {dtype} numbers, and the average of "
            f"complex tensor {names[0]!r} would lose its imaginary part; leave complex tensors out with "
            f"include=lambda name: ... (their average: a separate emakit.EMA)"
        )
