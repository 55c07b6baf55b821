"""``update()`` inside a ``torch.compile``'d training step: one graph break, no recompiles."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import emakit
from emakit import schedules

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402


def _graph_breaks() -> int:
    return sum(counters["graph_break"].values())


def _compiled_steps(make_average, steps: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    average = make_average(model)

    def forward_and_update(x):
        y = model(x).square().mean()
        average.update()
        return y * 2

    dynamo.reset()
    counters.clear()
    compiled = torch.compile(forward_and_update, backend="eager")
    frames = []
    for _ in range(steps):
        with torch.no_grad():
            model[0].weight.add_(0.01)  # the weights move, as training would move them
        compiled(torch.randn(8, 4))
        frames.append(counters["frames"]["total"])
    return average, frames


@pytest.mark.parametrize(
    "make_average",
    [
        lambda m: emakit.EMA(m, schedule=schedules.warmup(power=2 / 3)),
        lambda m: emakit.EMA(m, schedule=schedules.power(sigma_rel=0.1)),
        lambda m: emakit.EMA(m, schedule=schedules.start_at(5, schedules.halflife(3))),
        lambda m: emakit.EMA(m, decay=0.9),
        lambda m: emakit.PowerEMA(m, sigma_rels=(0.05, 0.1)),
    ],
    ids=["warmup", "power", "start_at", "constant", "PowerEMA"],
)
def test_update_in_a_compiled_step_breaks_once_and_never_recompiles(make_average):
    average, frames = _compiled_steps(make_average, 12)
    assert _graph_breaks() == 1
    assert frames[-1] == frames[1], f"frames compiled after each step: {frames}"  # decays changed every step
    # The same updates eagerly give the same average.
    eager, _ = _eager(make_average, 12)
    for name, value in eager.state_dict()["averages"][0].items():
        assert torch.equal(average.state_dict()["averages"][0][name], value), name
    assert average.t == 12


def _eager(make_average, steps: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    average = make_average(model)
    for _ in range(steps):
        with torch.no_grad():
            model[0].weight.add_(0.01)
            model(torch.randn(8, 4))
        average.update()
    return average, None


def test_swapped_warns_under_inductor_freezing():
    config = pytest.importorskip("torch._inductor.config")
    model = nn.Linear(3, 3)
    ema = emakit.EMA(model, decay=0.9)
    with config.patch(freezing=True), pytest.warns(RuntimeWarning, match="freezing is on"):
        with ema.swapped():
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ema.swapped():  # no warning by default
            pass
