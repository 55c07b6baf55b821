"""The EMA-length sweep on ordinary checkpoints: rebuild each length from them, score it, find the best.

The same contract as :func:`emakit.posthoc.sweep` on snapshots: ``evaluate(model)`` scores each
length, the model gets its own weights back afterwards, ``search=True`` runs a golden-section
search over ``log(sigma_rel)``. The checkpoints are read once per batch of lengths (as many
averages as fit in ``max_memory``). Each row carries the rebuilt EMA's error estimate and the
profile mass before the first checkpoint instead of the snapshot solve's fit error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import raw_weights
from .average import average_many
from .raw_files import WHERE, CheckpointSourceError, RawCheckpoint, find
from .sweep import SweepResult, as_metrics, check_grid, golden_section, search_budget, write_report


def match_to_model(state: Mapping[str, Tensor], model: torch.nn.Module) -> dict[str, Tensor]:
    """``state`` with the names of ``model.state_dict()``: equal, or after removing one common prefix (``model.``)."""
    want = set(model.state_dict())
    if set(state) == want:
        return dict(state)
    some = next(iter(state))
    for name in want:
        if some.endswith("." + name):
            prefix = some[: len(some) - len(name)]
            if all(k.startswith(prefix) for k in state) and {k[len(prefix) :] for k in state} == want:
                return {k[len(prefix) :]: v for k, v in state.items()}
    missing, extra = sorted(want - set(state)), sorted(set(state) - want)
    raise CheckpointSourceError(
        f"{WHERE}: the checkpoints do not hold this model's tensors: missing {missing[:5]}, extra {extra[:5]} "
        f"(name the nested state dict with key=)"
    )


def sweep_checkpoints(
    checkpoints: Any,
    evaluate: Callable[[torch.nn.Module], float | Mapping[str, float]],
    *,
    model: torch.nn.Module,
    sigma_rel: Sequence[float],
    metric: str | None = None,
    lower_is_better: bool = True,
    search: bool = False,
    max_evaluations: int | None = None,
    references: Mapping[str, float] | None = None,
    out: str | Path | None = None,
    plot: bool = True,
    max_memory: int = 1 << 30,
    key: str | None = None,
    step_key: str | None = None,
    times: Sequence[float] | None = None,
    trust: bool = False,
) -> SweepResult:
    """Score the EMA of each ``sigma_rel`` rebuilt from raw checkpoints (see :func:`emakit.posthoc.sweep`)."""
    if not callable(evaluate):
        raise TypeError(f"sweep: evaluate must be a callable model -> float or dict, got {evaluate!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"sweep: model must be a torch.nn.Module, got {type(model).__name__}")
    grid = check_grid(sigma_rel)
    chosen = find(checkpoints, times=times, step_key=step_key, trust=trust)
    backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
    scored: dict[float, dict] = {}
    names: list[str] = []

    def score_batch(values: list[float]) -> None:
        for s, row in zip(values, _rebuild(chosen, values, key, trust)):
            state, averaged = row
            model.load_state_dict(match_to_model(state, model))
            metrics, name = as_metrics(evaluate(model), metric)
            names.append(name)
            scored[s] = {
                "sigma_rel": s, "error_estimate": averaged.error_estimate,
                "mass_before_first": averaged.mass_before_first, "metrics": metrics, "metric": metrics[name],
            }  # fmt: skip

    try:
        if search:
            _search(grid, score_batch, scored, max_evaluations, lower_is_better)
        else:
            per_output = 4 * sum(v.numel() for v in backup.values() if v.is_floating_point())
            batch = max(1, int(max_memory // max(per_output, 1)))
            for i in range(0, len(grid), batch):
                score_batch(grid[i : i + batch])
    finally:
        model.load_state_dict(backup)
    result = SweepResult.collect(scored, names, lower_is_better, references)
    if out is not None:
        write_report(Path(out), result, plot=plot)
    return result


def _rebuild(chosen: list[RawCheckpoint], values: list[float], key, trust) -> list[tuple[dict[str, Tensor], Any]]:
    ts = [c.t for c in chosen]
    quads = [raw_weights.hat_weights(ts, raw_weights.profile(ts[-1], sigma_rel=s)) for s in values]
    rows = average_many(
        chosen, [q.weights for q in quads], [f"sigma_rel={s:g}" for s in values], quad=quads, key=key,
        trust=trust, accumulate=torch.float32, dtype=None, progress=False,
    )  # fmt: skip
    return [(a.state_dict, a) for a in rows]


def _search(grid, score_batch, scored, max_evaluations, lower_is_better) -> None:
    budget = search_budget(max_evaluations, grid)

    def one(s: float) -> float:
        score_batch([s])
        return scored[s]["metric"]

    golden_section(one, grid[0], grid[-1], budget, lower_is_better)
