"""``averaged_module()``: a module of the model's class whose tensors are the averages themselves."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import emakit


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.body(x))))


class NoDeepcopy(Net):
    def __deepcopy__(self, memo):
        raise RuntimeError("this module cannot be deep-copied")


def train(model, ema, steps=5):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        model.train()
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
        ema.update()


def tensor_ptrs(module: nn.Module) -> dict[str, int]:
    return {k: v.data_ptr() for k, v in module.state_dict(keep_vars=True).items()}


def test_view_is_the_average_without_a_copy_and_stays_current():
    model = NoDeepcopy()  # must not need deepcopy
    model.head.bias.requires_grad_(False)
    ema = emakit.EMA(model, decay=0.7)
    train(model, ema)
    view = ema.averaged_module()
    assert type(view) is NoDeepcopy and not view.training and not view.bn.training
    storage = {v.data_ptr() for v in ema.state_dict()["averages"][0].values()}
    storage |= {v.data_ptr() for v in ema.state_dict()["copies"].values()}
    ptrs = tensor_ptrs(view)
    for name, ptr in ptrs.items():
        if name == "head.bias":
            assert view.head.bias is model.head.bias  # frozen: shared with the model
        else:
            assert ptr in storage, name  # the average's own memory
    x = torch.randn(5, 4)
    for _ in range(2):
        with torch.no_grad():
            got = view(x)
            model.eval()
            with ema.swapped():
                want = model(x)
        assert torch.equal(got, want)
        train(model, ema, steps=3)  # the same view sees the new averages
    assert list(view.state_dict()) == list(model.state_dict())
    assert not any(p.requires_grad for p in view.parameters() if p is not model.head.bias)


def test_view_refuses_train_and_eval_forward_writes_nothing():
    model = Net()
    ema = emakit.EMA(model, decay=0.7)
    train(model, ema)
    view = ema.averaged_module()
    before = {k: v.clone() for k, v in view.state_dict().items()}
    with pytest.raises(RuntimeError, match="stays in eval mode"):
        view.train()
    with pytest.raises(RuntimeError, match="stays in eval mode"):
        view.bn.train()
    assert view.eval() is view
    view(torch.randn(8, 4))  # eval mode: BatchNorm reads its running statistics, writes none
    for k, v in view.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bf16_model_gets_an_fp32_view():
    model = Net().to(torch.bfloat16)
    ema = emakit.EMA(model, decay=0.9)
    view = ema.averaged_module()
    assert view.body.weight.dtype == torch.float32 and view.bn.num_batches_tracked.dtype == torch.int64


def test_view_follows_storage_changes():
    model = Net()
    model.head.requires_grad_(False)
    ema = emakit.EMA(model, decay=0.7)
    view = ema.averaged_module()
    assert view.head.weight is model.head.weight
    model.head.requires_grad_(True)
    train(model, ema, steps=2)  # head is averaged now
    assert view.head.weight.data_ptr() == ema.state_dict()["averages"][0]["head.weight"].data_ptr()
    ema.to(dtype=torch.float64)
    assert view.body.weight.dtype == torch.float64
    assert view.body.weight.data_ptr() == ema.state_dict()["averages"][0]["body.weight"].data_ptr()


def test_view_of_a_wrapped_model_is_the_plain_model():
    model = Net()
    ema = emakit.EMA(nn.DataParallel(model), decay=0.7)
    view = ema.averaged_module()
    assert type(view) is Net
    assert list(view.state_dict()) == list(model.state_dict())


def test_power_ema_view_per_profile():
    model = Net()
    pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10))
    train(model, pema, steps=6)
    for sigma_rel in pema.sigma_rels:
        view = pema.averaged_module(sigma_rel)
        want = pema.averaged_state_dict(sigma_rel)
        for k, v in view.state_dict().items():
            assert torch.equal(v, want[k])
    with pytest.raises(ValueError, match="pick one with sigma_rel"):
        pema.averaged_module()


def test_compiled_view_sees_the_current_averages():
    model = Net()
    ema = emakit.EMA(model, decay=0.7)
    view = ema.averaged_module()
    compiled = torch.compile(view, backend="eager")
    x = torch.randn(5, 4)
    for _ in range(3):
        train(model, ema, steps=2)
        model.eval()
        with torch.no_grad(), ema.swapped():
            want = model(x)
        assert_close(compiled(x), want)


def test_module_view_benchmark_runs_at_tiny_scale():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "bench_module_view.py"), "--layers", "2", "--width", "32",
         "--reps", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "emakit averaged_module()(x)" in out.stdout and "no tensor" in out.stdout


# --------------------------------------------------------------------------- refusals: no drift, no writes


def _trained_view():
    torch.manual_seed(0)
    model = Net()
    ema = emakit.EMA(model, decay=0.7)
    train(model, ema, steps=3)
    return model, ema, ema.averaged_module()


def _averages(ema):
    return {k: v.clone() for k, v in ema.state_dict()["averages"][0].items()}


@pytest.mark.parametrize(
    "call",
    [lambda v: v.half(), lambda v: v.to(torch.float64), lambda v: v.bfloat16(), lambda v: v.to_empty(device="cpu")],
    ids=["half", "to(float64)", "bfloat16", "to_empty"],
)
def test_view_refuses_casts_that_would_stop_following_the_averages(call):
    model, ema, view = _trained_view()
    before = _averages(ema)
    with pytest.raises(RuntimeError, match="refuses a cast or move.*ema.to"):
        call(view)
    assert all(p.dtype == torch.float32 for p in view.parameters())
    train(model, ema, steps=1)  # the view still follows the averages
    assert_close(view.head.weight, ema.averaged_state_dict()["head.weight"], rtol=0, atol=0)
    assert not torch.equal(ema.averaged_state_dict()["head.weight"], before["head.weight"])


def test_view_allows_moves_and_casts_that_change_nothing():
    _, ema, view = _trained_view()
    ptrs = tensor_ptrs(view)
    assert view.to("cpu") is view and view.float() is view and view.to(torch.float32) is view
    assert view.eval() is view
    assert tensor_ptrs(view) == ptrs


@pytest.mark.parametrize(
    "call",
    [
        lambda v: v.load_state_dict({k: torch.zeros_like(t) for k, t in v.state_dict().items()}),
        lambda v: v.apply(lambda m: [torch.nn.init.zeros_(p) for p in m.parameters(recurse=False)]),
        lambda v: v.head.load_state_dict({k: torch.zeros_like(t) for k, t in v.head.state_dict().items()}),
    ],
    ids=["load_state_dict", "apply", "submodule.load_state_dict"],
)
def test_view_refuses_writes_into_the_averages(call):
    _, ema, view = _trained_view()
    before = _averages(ema)
    with pytest.raises(RuntimeError, match=r"would write into the averages.*load_averaged_state_dict"):
        call(view)
    for name, value in _averages(ema).items():
        assert torch.equal(value, before[name]), name
