"""The float64 random walk that the storage benchmarks average, with its exact EMAs as the truth.

``walk(...)`` runs ``steps`` updates of a ``params``-element float64 "weight" that takes
Gaussian steps, averaged by a PowerEMA tracking ``tracked`` that ``save(pema)`` snapshots
``snapshots`` times, and by one tracking every ``targets`` length exactly. ``error`` is the
relative error the benchmarks report: ``||got - truth|| / ||truth - final weights||``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

import emakit


def walk(params: int, steps: int, snapshots: int, targets, save: Callable[[emakit.PowerEMA], None],
         tracked=(0.05, 0.10), seed: int = 0) -> tuple[emakit.PowerEMA, torch.Tensor]:  # fmt: skip
    """Returns the PowerEMA tracking ``targets`` exactly and the final weights."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(1, 1, bias=False)
    model.weight = torch.nn.Parameter(torch.zeros(params, 1, dtype=torch.float64))
    pema = emakit.PowerEMA(model, sigma_rels=tracked)
    truth = emakit.PowerEMA(model, sigma_rels=targets)
    every = steps // snapshots
    for step in range(1, steps + 1):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight), alpha=1e-2)
        pema.update()
        truth.update()
        if step % every == 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # fp16 snapshots warn
                save(pema)
    return truth, model.weight.detach().clone()


def error(got: torch.Tensor, truth: emakit.PowerEMA, sigma_rel: float, final: torch.Tensor) -> float:
    want = truth.averaged_state_dict(sigma_rel=sigma_rel)["weight"]
    return float((got - want).norm() / (want - final).norm())
