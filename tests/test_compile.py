"""``update()`` inside a ``torch.compile``'d training step: one graph break, no recompiles."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close

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


# --------------------------------------------------------------------------- compiled models run the averages

# Every path that runs averaged weights (the module view, swapped(), copy_to()) is compared with a
# functional forward of a float64 average computed here, for a model compiled in place
# (nn.Module.compile, before or after the average is built) or wrapped by torch.compile.


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def _reference_forward(avg: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    a = {k: v.float() for k, v in avg.items()}
    h = torch.nn.functional.linear(x, a["fc1.weight"], a["fc1.bias"])
    h = torch.nn.functional.batch_norm(h, a["bn.running_mean"], a["bn.running_var"], a["bn.weight"], a["bn.bias"])
    return torch.nn.functional.linear(torch.relu(h), a["fc2.weight"], a["fc2.bias"])


def _train_with_reference(compile_how: str, make_average, decay_of, steps: int = 6):
    """Train a compiled model; return (model, what runs it, average, float64 reference average)."""
    torch.manual_seed(0)
    model = _Net()
    if compile_how == "Module.compile before":
        model.compile(backend="eager")
    average = make_average(model)
    if compile_how == "Module.compile after":
        model.compile(backend="eager")
    runner = torch.compile(model, backend="eager") if compile_how == "torch.compile" else model
    floats = lambda: {k: v.detach().double().clone() for k, v in model.state_dict().items() if v.is_floating_point()}  # noqa: E731
    reference = floats()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for t in range(1, steps + 1):
        model.train()
        opt.zero_grad()
        runner(torch.randn(8, 4)).square().mean().backward()
        opt.step()
        average.update(runner)
        d = decay_of(t)
        reference = {k: d * reference[k] + (1 - d) * w for k, w in floats().items()}
    return model, runner, average, reference


_AVERAGES = {
    "EMA": (lambda m: emakit.EMA(m, decay=0.7), lambda t: 0.7),
    "PowerEMA": (lambda m: emakit.PowerEMA(m, gammas=(3.0,)), lambda t: (1 - 1 / t) ** 4.0),
}


@pytest.mark.parametrize("compile_how", ["Module.compile before", "Module.compile after", "torch.compile"])
@pytest.mark.parametrize("kind", list(_AVERAGES))
def test_compiled_models_run_the_averaged_weights_on_every_path(compile_how, kind):
    make_average, decay_of = _AVERAGES[kind]
    model, runner, average, reference = _train_with_reference(compile_how, make_average, decay_of)
    x = torch.randn(5, 4)
    expected = _reference_forward(reference, x)
    with torch.no_grad():
        raw = runner.eval()(x)
    assert not torch.allclose(raw, expected, atol=1e-3)  # the raw weights give another answer
    tracked = model.bn.num_batches_tracked.clone()

    view = average.averaged_module()
    with torch.no_grad():
        assert_close(view(x), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.bn.num_batches_tracked, tracked)  # the view ran itself, not the model

    with average.swapped(model=runner), torch.no_grad():
        assert_close(runner(x), expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(runner(x), raw)  # restored

    other = _Net()
    other.compile(backend="eager")
    average.copy_to(other)
    with torch.no_grad():
        assert_close(other.eval()(x), expected, rtol=1e-5, atol=1e-6)


def test_view_of_a_compiled_submodule_runs_its_own_weights_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = _Net()
    model.fc1 = torch.compile(model.fc1, backend="eager")  # an OptimizedModule inside the model
    ema = emakit.EMA(model, decay=0.5)
    with torch.no_grad():
        model.fc1.weight.add_(1.0)
    ema.update()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    view = ema.averaged_module()
    x = torch.randn(5, 4)
    avg = {k: v.double() for k, v in ema.averaged_state_dict(dtype="average").items()}
    with torch.no_grad():
        assert_close(view(x), _reference_forward(avg, x), rtol=1e-5, atol=1e-6)
    assert view.fc1._orig_mod is not model.fc1._orig_mod
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the model's tensors are untouched
    assert "_orig_mod" not in model.fc1._orig_mod._modules  # and so is its structure


def test_in_place_compiled_view_is_compiled_with_the_models_settings():
    model = _Net()
    model.compile(backend="eager")
    view = emakit.EMA(model, decay=0.5).averaged_module()
    assert view._compiled_call_impl is not None
    assert view._compiled_call_impl is not model._compiled_call_impl
