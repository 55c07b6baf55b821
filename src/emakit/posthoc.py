"""Post-hoc EMA: the average of any length, rebuilt after training from power-EMA snapshots.

Karras et al. (EDM2, App. C.3). Each snapshot ``i`` is a power-function average with
profile ``p_i(tau) = (gamma_i + 1) tau**gamma_i / t_i**(gamma_i + 1)`` on ``[0, t_i]``. A
target profile ``p_r`` (another ``sigma_rel``, another time, or a classic EMA) is fitted by
least squares, ``min_x || sum_i x_i p_i - p_r ||``, which is the linear system ``A x = b``
with ``A_ij = <p_i, p_j>`` and ``b_i = <p_i, p_r>``. The reconstruction is
``sum_i x_i * snapshot_i``. The solve runs in float64 (``A`` is ill-conditioned) and the
weights are normalised to sum to 1. How well the target is matched is known before any
weight is read: the relative profile error ``||p x - p_r||**2 / ||p_r||**2``.

    snaps = posthoc.list_snapshots("run/phema")
    sol = posthoc.solve_coefficients(snaps, sigma_rel=0.08)
    print(sol.fit_error, sol.noise_gain)
    sd = posthoc.reconstruct("run/phema", sigma_rel=0.08)       # a model state dict

From ordinary checkpoints: :func:`average_checkpoints` and :func:`sweep_checkpoints` (docs/average.md).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import schedules
from ._files import collector as _collector
from ._posthoc.average import Averaged, average_checkpoints, save_average
from ._posthoc.profiles import exponential_inner, power_inner
from ._posthoc.raw_files import CheckpointSourceError
from ._posthoc.raw_sweep import sweep_checkpoints
from ._posthoc.solve import _normal_equations, _target
from ._posthoc.stream import _out_dtype, _progress, _read_extras, _weighted_sums
from ._posthoc.sweep import SweepResult, as_metrics, check_grid, golden_section, search_budget, write_report
from .snapshots import (
    SnapshotError,
    SnapshotInfo,
    clear_decoded_cache,
    open_tensors,
    read_info,
    require_trust,
    snapshot_paths,
)

__all__ = [
    "FIT_ERROR_WARN", "Solution", "SnapshotError", "SnapshotInfo", "power_inner", "exponential_inner",
    "list_snapshots", "solve_coefficients", "reconstruct", "reliable_range", "sweep", "SweepResult",
    "DEFAULT_SWEEP", "average_checkpoints", "save_average", "Averaged", "sweep_checkpoints",
    "CheckpointSourceError",
]  # fmt: skip

#: Relative profile error above which a request is reported as poorly supported.
FIT_ERROR_WARN = 1e-3


# --------------------------------------------------------------------------- snapshots


@_collector.paused()
def list_snapshots(directory: str | os.PathLike) -> list[SnapshotInfo]:
    """Every snapshot of a directory, checked and sorted by time.

    Raises :class:`SnapshotError` naming the file for an empty directory, an unreadable
    (truncated, corrupted) file, or snapshots of different models (names or shapes differ).
    """
    paths = snapshot_paths(directory)
    if not paths:
        raise SnapshotError(f"{directory}: no snapshots (phema-*.safetensors) in this directory")
    infos = sorted((read_info(p) for p in paths), key=lambda s: s.t)
    _check_same_run(infos)
    return infos


def _check_same_run(infos: Sequence[SnapshotInfo]) -> None:
    """Raise unless the snapshots come from one model: the same copied tensors, and every shape agrees.

    A parameter may be averaged in later snapshots only: it became trainable during the run.
    Earlier snapshots hold it as static (its value then is its average) or, when saved with
    ``static=False``, not at all (reconstruction then says which snapshot lacks it).
    """
    first = infos[0]
    for info in infos[1:]:
        if info.shapes == first.shapes and info.copied == first.copied:
            continue  # the usual case, compared in C (a model of 2000 tensors, 50 files: 0.2 s in Python)
        common = info.shapes.keys() & first.shapes.keys()
        if info.copied != first.copied or any(info.shapes[n] != first.shapes[n] for n in common):
            diff = sorted(set(info.shapes.items()) ^ set(first.shapes.items()))
            detail = f"first difference: {diff[0][0]!r}" if diff else "tensor lists differ"
            raise SnapshotError(
                f"{info.path}: holds other tensors than {first.path} ({detail}); snapshots of "
                f"different models cannot be combined"
            )


def _as_infos(snaps: str | os.PathLike | Iterable[SnapshotInfo]) -> list[SnapshotInfo]:
    if isinstance(snaps, (str, os.PathLike)):
        return list_snapshots(snaps)
    infos = sorted(snaps, key=lambda s: s.t)
    if not infos:
        raise SnapshotError("no snapshots given")
    _check_same_run(infos)
    return infos


# --------------------------------------------------------------------------- solve


@dataclass(frozen=True)
class Solution:
    """Least-squares weights of the snapshots for one target profile.

    ``weights[i][j]`` multiplies profile ``j`` of ``snapshots[i]``; they sum to 1.
    ``fit_error`` is the relative profile error ``||p x - p_r||**2 / ||p_r||**2`` (0 means
    exact); ``noise_gain`` is ``sum |x|`` (1 for non-negative weights; large values amplify
    the snapshots' rounding noise).
    """

    target: str
    t: float
    snapshots: tuple[SnapshotInfo, ...]
    weights: tuple[tuple[float, ...], ...]
    fit_error: float
    noise_gain: float


def solve_coefficients(
    snaps: str | os.PathLike | Iterable[SnapshotInfo],
    sigma_rel: float | None = None,
    *,
    gamma: float | None = None,
    decay: float | None = None,
    halflife: float | None = None,
    t: float | None = None,
    warn: bool = True,
) -> Solution:
    """Weights that rebuild the target EMA at time ``t`` (default: the last snapshot's) from snapshots.

    The target is a power profile (``sigma_rel`` or ``gamma``) or a classic EMA (constant
    per-unit ``decay`` or ``halflife``, in the snapshots' time unit; fitted against its
    truncated exponential profile). Only snapshots with ``0 < t_i <= t`` are used. Warns when
    the fit is poor (``fit_error > FIT_ERROR_WARN``) or a power target is shorter than every
    tracked profile (post hoc cannot sharpen beyond the snapshots).

        sol = solve_coefficients("run/phema", sigma_rel=0.08)
    """
    label, target_gamma, rate = _target(sigma_rel, gamma, decay, halflife)
    infos = _as_infos(snaps)
    t_last = infos[-1].t
    if t is None:
        t = t_last
    elif not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
        raise ValueError(f"t must be a finite number > 0, got t={t!r}")
    used = [s for s in infos if 0 < s.t <= t]
    if not used:
        raise ValueError(f"t={t} is before the first snapshot (t={infos[0].t} in {infos[0].path})")
    a, b, norm = _normal_equations(used, t, target_gamma, rate)
    x = torch.linalg.lstsq(a, b.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    x = x / x.sum()
    fit = float(x @ a @ x - 2 * x @ b + norm) / norm
    fit = max(fit, 0.0)
    sol_weights, k = [], 0
    for s in used:
        sol_weights.append(tuple(float(v) for v in x[k : k + s.num_profiles]))
        k += s.num_profiles
    solution = Solution(label, float(t), tuple(used), tuple(sol_weights), fit, float(x.abs().sum()))
    if warn:
        _warn_if_poor(solution, target_gamma)
    return solution


def _warn_if_poor(solution: Solution, target_gamma: float | None) -> None:
    """Warn (at the caller of ``solve_coefficients``) when the target is poorly supported."""
    label, fit, t = solution.target, solution.fit_error, solution.t
    shortest = max(g for s in solution.snapshots for g in s.gammas)
    if target_gamma is not None and target_gamma > shortest * (1 + 1e-9):
        warnings.warn(
            f"posthoc: {label} is shorter than every tracked profile (largest gamma "
            f"{shortest:.4g}); the reconstruction is a poor fit (relative profile error "
            f"{fit:.2e})",
            stacklevel=3,
        )
    elif fit > FIT_ERROR_WARN:
        warnings.warn(
            f"posthoc: {label} at t={t:g} is poorly supported by these snapshots (relative profile "
            f"error {fit:.2e} > {FIT_ERROR_WARN:g})",
            stacklevel=3,
        )


def reliable_range(
    snaps: str | os.PathLike | Iterable[SnapshotInfo], *, t: float | None = None, max_fit_error: float = FIT_ERROR_WARN
) -> tuple[float, float] | None:
    """The ``sigma_rel`` interval whose reconstructions fit within ``max_fit_error`` (or None).

    Scans a log grid from 0.001 to 0.288; the interval is the contiguous stretch around the
    best-fitting point.
    """
    infos = _as_infos(snaps)
    grid = [0.001 * (288.0 ** (i / 119)) for i in range(120)]
    grid = [s for s in grid if s < schedules.SIGMA_REL_MAX]
    errors = [solve_coefficients(infos, sigma_rel=s, t=t, warn=False).fit_error for s in grid]
    best = min(range(len(grid)), key=errors.__getitem__)
    if errors[best] > max_fit_error:
        return None
    lo = hi = best
    while lo > 0 and errors[lo - 1] <= max_fit_error:
        lo -= 1
    while hi < len(grid) - 1 and errors[hi + 1] <= max_fit_error:
        hi += 1
    return grid[lo], grid[hi]


# --------------------------------------------------------------------------- reconstruct


@_collector.paused()
def reconstruct(
    snaps: str | os.PathLike | Iterable[SnapshotInfo],
    sigma_rel: float | Sequence[float] | None = None,
    *,
    gamma: float | None = None,
    decay: float | None = None,
    halflife: float | None = None,
    t: float | None = None,
    dtype: torch.dtype | str = "model",
    progress: bool = True,
    like: Mapping[str, Tensor] | None = None,
    trust: bool = False,
    accumulate: torch.dtype = torch.float32,
) -> dict[str, Tensor] | list[dict[str, Tensor]]:
    """Rebuild the EMA of the requested length from a snapshot directory (or a list of snapshots).

    Returns a model state dict (keys as ``averaged_state_dict()``), or a list of them when
    ``sigma_rel`` is a list. Streams: each snapshot file is read once for all requested
    lengths, one tensor at a time, so memory holds the outputs plus one tensor. Copied
    tensors (``num_batches_tracked``) and stored static ones come from the latest snapshot
    used. ``dtype="model"`` casts to the model's dtypes, ``"float32"`` or a torch dtype to
    that. A progress bar shows when tqdm is installed and ``progress`` is on.

    Snapshots written by several ranks (``phema-*.shards``) are read in one process, no
    process group needed. ``like=`` a sharded state dict (e.g. ``model.state_dict()`` of the
    FSDP2 model, or a PowerEMA's ``averaged_state_dict()``) reconstructs in a distributed
    run instead: each rank reads only the parts its DTensors hold and gets DTensors back
    (ready for ``dcp.save`` or ``model.load_state_dict``). Sharded snapshots of emakit 0.1
    (``phema-*.dcp``) are read only with ``trust=True``: DCP's metadata is a pickle, which
    can run code (and reading them with ``like=`` is collective).
    ``accumulate=torch.float64`` sums the weighted snapshots in float64 (one float64 copy of
    each output while summing): lower rounding error where the fit is nearly exact.

        sds = reconstruct("run/phema", sigma_rel=[0.05, 0.10, 0.15])
    """
    many = isinstance(sigma_rel, (list, tuple))
    requests = list(sigma_rel) if many else [sigma_rel]
    if many and not requests:
        raise ValueError("sigma_rel: an empty list requests nothing")
    infos = _as_infos(snaps)
    solutions = [solve_coefficients(infos, s, gamma=gamma, decay=decay, halflife=halflife, t=t) for s in requests]
    out_dtype = _out_dtype(dtype)
    used = solutions[0].snapshots
    latest = used[-1]
    for info in used:
        require_trust(info, trust)  # before anything is read
    reader_for = _reader_factory(like, latest, trust)
    bar = _progress(len(used) * len(latest.averaged) * max(s.num_profiles for s in used), progress)
    try:
        sums = _weighted_sums(solutions, reader_for, bar, accumulate)
        extras = _read_extras(latest, reader_for)
    finally:
        bar.close()
        clear_decoded_cache()  # decoded compact snapshots are not kept past the reconstruction
    results = [_state_dict(acc, extras, latest, out_dtype, like) for acc in sums]
    return results if many else results[0]


def _reader_factory(like: Mapping[str, Tensor] | None, latest: SnapshotInfo, trust: bool):
    """``reader_for(info, order)``: this rank's parts in ``like``'s layout, or (no ``like``) the whole tensors."""
    if like is not None:
        from ._posthoc.shard_reader import ShardReader

        return ShardReader.factory(like, latest)

    def reader_for(info, order):
        return open_tensors(info, order, trust=trust)

    reader_for.whole_files = True  # whole tensors of plain files may be read ahead, across files
    return reader_for


def _state_dict(
    acc: dict[str, Tensor],
    extras: dict[str, Tensor],
    latest: SnapshotInfo,
    out_dtype: torch.dtype | None,
    like: Mapping[str, Tensor] | None,
) -> dict[str, Tensor]:
    """One reconstruction as the model's state dict: cast, completed with the extras, in key order."""
    values = {}
    for name, v in acc.items():
        target = latest.model_dtypes.get(name, torch.float32) if out_dtype is None else out_dtype
        values[name] = v.to(target)
    values.update(extras)
    if like is not None:
        from ._posthoc.shard_reader import wrap_like

        values = wrap_like(like, values)
    ordered = {}
    for key in latest.keys:
        primary = latest.aliases.get(key, key)
        if primary in values:
            ordered[key] = values[primary]
    return ordered


# --------------------------------------------------------------------------- sweep

#: sigma_rel values a sweep evaluates by default: a log grid from 0.01 to 0.25.
DEFAULT_SWEEP = tuple(round(0.01 * 25 ** (i / 11), 4) for i in range(12))


def sweep(
    snaps: str | os.PathLike | Iterable[SnapshotInfo],
    evaluate: Callable[[torch.nn.Module], float | Mapping[str, float]],
    *,
    model: torch.nn.Module,
    sigma_rel: Sequence[float] = DEFAULT_SWEEP,
    t: float | None = None,
    metric: str | None = None,
    lower_is_better: bool = True,
    search: bool = False,
    max_evaluations: int | None = None,
    references: Mapping[str, float] | None = None,
    out: str | os.PathLike | None = None,
    plot: bool = True,
    max_memory: int = 1 << 30,
    trust: bool = False,
) -> SweepResult:
    """Reconstruct each EMA length, load it into ``model``, score it with ``evaluate(model)``; find the best.

    ``evaluate`` returns a float or a dict of floats (``metric=`` names the one that ranks,
    default its first key); lower is better unless ``lower_is_better=False``. The model
    holds its own weights again afterwards (also when ``evaluate`` raises). Returns a
    :class:`SweepResult`: per length the fit error and noise gain of the solve, the metrics,
    and the best row.

    Memory: the snapshot files are read once per batch of lengths; a batch holds as many
    reconstructions as fit in ``max_memory`` bytes (each is one fp32 copy of the averaged
    tensors, at least one per batch), so the whole sweep reads the files once when they fit.

    ``search=True`` evaluates far fewer lengths: a golden-section search over
    ``log(sigma_rel)`` between the smallest and largest ``sigma_rel`` given, clipped to the
    range the snapshots reconstruct reliably (:func:`reliable_range`), with
    ``max_evaluations`` (default: half the grid, at least 4). The EMA-length curve is
    U-shaped, so it converges on the bottom of the U.

    ``out=`` writes ``report.json``, ``report.md`` (the answer first) and ``sweep.png`` (log
    x axis; ``references``, e.g. ``{"raw weights": 32.9}``, as horizontal lines).

        result = posthoc.sweep("run/phema", evaluate=fid, model=model, out="run/sweep")
        model.load_state_dict(posthoc.reconstruct("run/phema", sigma_rel=result.best["sigma_rel"]))
    """
    grid = _check_sweep(evaluate, model, sigma_rel)
    infos = _as_infos(snaps)
    backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
    scored: dict[float, dict] = {}
    names: list[str] = []
    score_batch = _scorer(infos, evaluate, model, metric, t, trust, scored, names)
    try:
        if search:
            _search(infos, grid, t, score_batch, scored, max_evaluations, lower_is_better)
        else:
            _score_grid(infos, grid, score_batch, max_memory)
    finally:
        model.load_state_dict(backup)
    result = SweepResult.collect(scored, names, lower_is_better, references)
    if out is not None:
        write_report(Path(out), result, plot=plot)
    return result


def _check_sweep(evaluate, model, sigma_rel) -> list[float]:
    """The ``sigma_rel`` grid of a sweep, once ``evaluate`` and ``model`` are checked."""
    if not callable(evaluate):
        raise TypeError(f"sweep: evaluate must be callable evaluate(model) -> float | dict, got {evaluate!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"sweep: model must be a torch.nn.Module, got {type(model).__name__}")
    return check_grid(sigma_rel)


def _scorer(infos, evaluate, model, metric, t, trust, scored: dict[float, dict], names: list[str]):
    """``score_batch(values)``: reconstruct those lengths, score each in ``model``, record its row in ``scored``."""

    def score_batch(values: list[float]) -> None:
        with warnings.catch_warnings():  # the table reports each fit error (and "reliable") instead
            warnings.filterwarnings("ignore", message="posthoc:", category=UserWarning)
            states = reconstruct(infos, sigma_rel=values, t=t, progress=False, trust=trust)
        for s, state in zip(values, states):
            model.load_state_dict(state)
            metrics, name = as_metrics(evaluate(model), metric)
            names.append(name)
            sol = solve_coefficients(infos, sigma_rel=s, t=t, warn=False)
            scored[s] = {
                "sigma_rel": s, "fit_error": sol.fit_error, "reliable": sol.fit_error <= FIT_ERROR_WARN,
                "noise_gain": sol.noise_gain, "metrics": metrics, "metric": metrics[name],
            }  # fmt: skip

    return score_batch


def _score_grid(infos, grid, score_batch, max_memory: int) -> None:
    """Every length of the grid, in batches of as many reconstructions as fit in ``max_memory`` bytes."""
    per_output = 4 * sum(math.prod(infos[-1].shapes[n]) for n in infos[-1].averaged)
    batch = max(1, int(max_memory // max(per_output, 1)))
    for i in range(0, len(grid), batch):
        score_batch(grid[i : i + batch])


def _search(infos, grid, t, score_batch, scored, max_evaluations, lower_is_better) -> None:
    budget = search_budget(max_evaluations, grid)
    lo, hi = grid[0], grid[-1]
    reliable = reliable_range(infos, t=t)
    if reliable is not None:
        lo, hi = max(lo, reliable[0]), min(hi, reliable[1])
    if not lo < hi:
        raise ValueError(
            f"sweep: no sigma_rel in [{grid[0]:g}, {grid[-1]:g}] is reconstructed reliably from these snapshots "
            f"(reliable range: {reliable}); widen sigma_rel or use search=False"
        )

    def one(s: float) -> float:
        score_batch([s])
        return scored[s]["metric"]

    golden_section(one, lo, hi, budget, lower_is_better)
