"""What happens when the model changes under the average: trainability, device and dtype, imports.

References are float64 re-computations of the EMA of each tensor's trajectory, written here.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import emakit
from emakit import posthoc, schedules


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.body(x))))


def step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model.train()
    opt.zero_grad()
    model(torch.randn(8, 4)).square().mean().backward()
    opt.step()


class Float64EMA:
    """EMA of every floating tensor's trajectory in float64, decay per update given."""

    def __init__(self, model: nn.Module) -> None:
        self.avg = {k: v.double().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def update(self, model: nn.Module, decay: float) -> None:
        for k, v in model.state_dict().items():
            if k in self.avg:
                self.avg[k] = decay * self.avg[k] + (1 - decay) * v.double()


# --------------------------------------------------------------------------- trainability


def test_parameter_unfrozen_mid_run_is_averaged_from_then_on():
    model = Net()
    model.body.requires_grad_(False)  # frozen backbone, unfrozen later (progressive unfreezing)
    ema = emakit.EMA(model, decay=0.8)
    assert "body.weight" not in ema.state_dict()["averages"][0]
    ref = Float64EMA(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for i in range(30):
        if i == 10:
            model.body.requires_grad_(True)
        step(model, opt)
        ref.update(model, ema.update())
    sd = ema.averaged_state_dict(dtype="average")
    moved = (sd["body.weight"] - model.body.weight).abs().max()
    assert moved > 1e-3  # the average lags behind the weights: it is an average, not a copy
    for name, want in ref.avg.items():
        assert_close(sd[name].double(), want, rtol=1e-5, atol=1e-6)
    assert "body.weight" in ema.state_dict()["averages"][0]


def test_unfrozen_parameter_costs_nothing_while_nothing_changes():
    model = Net()
    model.head.requires_grad_(False)
    ema = emakit.EMA(model, decay=0.8)
    groups = len(ema._groups)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        step(model, opt)
        ema.update()
    assert len(ema._groups) == groups  # no promotion without a change
    model.head.weight.requires_grad_(True)  # one of two frozen tensors
    ema.update()
    assert len(ema._groups) == groups + 1
    assert ema._spec.frozen == ["head.bias"]


def test_power_ema_unfrozen_parameter_matches_the_power_profile():
    model = Net()
    model.head.requires_grad_(False)
    pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10))
    refs = [Float64EMA(model), Float64EMA(model)]
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for i in range(40):
        if i == 15:
            model.head.requires_grad_(True)
        step(model, opt)
        for ref, decay in zip(refs, pema.update()):
            ref.update(model, decay)
    for sigma_rel, ref in zip(pema.sigma_rels, refs):
        sd = pema.averaged_state_dict(sigma_rel, dtype="average")
        for name, want in ref.avg.items():
            assert_close(sd[name].double(), want, rtol=1e-5, atol=1e-6)


def test_parameter_frozen_mid_run_stays_averaged():
    # Documented: an averaged parameter that is frozen later keeps being averaged; its average
    # moves toward the now constant value, as the EMA of its trajectory does.
    model = Net()
    ema = emakit.EMA(model, decay=0.7)
    ref = Float64EMA(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for i in range(20):
        if i == 8:
            model.body.requires_grad_(False)
        step(model, opt)
        ref.update(model, ema.update())
    sd = ema.averaged_state_dict(dtype="average")
    for name, want in ref.avg.items():
        assert_close(sd[name].double(), want, rtol=1e-5, atol=1e-6)


def _run(model, ema, opt, steps, unfreeze_at=None, start=0):
    for i in range(start, steps):
        if unfreeze_at is not None and i == unfreeze_at:
            model.body.requires_grad_(True)
        step(model, opt)
        ema.update()


def test_checkpoint_of_a_promoted_parameter_resumes_exactly(tmp_path):
    def build():
        torch.manual_seed(3)
        model = Net()
        model.body.requires_grad_(False)
        return model, emakit.EMA(model, decay=0.9), torch.optim.SGD(model.parameters(), lr=0.1)

    torch.manual_seed(4)
    model, ema, opt = build()
    _run(model, ema, opt, 6, unfreeze_at=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = {"ema": {**ema.state_dict()}, "opt": opt.state_dict()}
    ckpt["ema"]["averages"] = [{k: v.clone() for k, v in p.items()} for p in ckpt["ema"]["averages"]]
    ema.save(tmp_path / "ema.dcp")
    rng = torch.get_rng_state()
    _run(model, ema, opt, 10, start=6)
    want = ema.state_dict()

    for load in ("state_dict", "dcp"):
        resumed, ema2, opt2 = build()  # frozen again, as a fresh process builds it
        resumed.load_state_dict(state)
        opt2.load_state_dict(ckpt["opt"])
        if load == "state_dict":
            ema2.load_state_dict(torch.load(_saved(tmp_path, ckpt["ema"]), weights_only=True))
        else:
            ema2.load(tmp_path / "ema.dcp")
        assert "body.weight" in ema2.state_dict()["averages"][0]  # averaged again, with its history
        resumed.body.requires_grad_(True)
        torch.set_rng_state(rng)
        _run(resumed, ema2, opt2, 10, start=6)
        got = ema2.state_dict()
        for name, value in want["averages"][0].items():
            assert torch.equal(got["averages"][0][name], value), (load, name)


def _saved(tmp_path, obj):
    path = tmp_path / "ema.pt"
    torch.save(obj, path)
    return path


def test_snapshots_across_an_unfreeze_reconstruct(tmp_path):
    model = Net()
    model.head.requires_grad_(False)
    pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(1, 41):
        if i == 15:
            model.head.requires_grad_(True)
        step(model, opt)
        pema.update()
        if i % 5 == 0:
            pema.save_snapshot(tmp_path / "phema")
    infos = posthoc.list_snapshots(tmp_path / "phema")
    assert "head.weight" in infos[0].static and "head.weight" in infos[-1].averaged
    # A tracked length at the last snapshot is that profile exactly.
    sd = posthoc.reconstruct(tmp_path / "phema", sigma_rel=0.10, progress=False)
    want = pema.averaged_state_dict(0.10)
    for name in ("head.weight", "body.weight"):
        assert_close(sd[name], want[name], rtol=1e-5, atol=1e-6)
    # Without the static values the early snapshots cannot stand in for the average: say so.
    model2 = Net()
    model2.head.requires_grad_(False)
    pema2 = emakit.PowerEMA(model2)
    for i in range(1, 11):
        if i == 6:
            model2.head.requires_grad_(True)
        pema2.update()
        if i % 5 == 0:
            pema2.save_snapshot(tmp_path / "bare", static=False)
    with pytest.raises(posthoc.SnapshotError, match="saved with static=False"):
        posthoc.reconstruct(tmp_path / "bare", sigma_rel=0.10, progress=False)


# --------------------------------------------------------------------------- device and dtype


def test_to_casts_the_averages_and_continues_exactly():
    model = Net()
    ema = emakit.EMA(model, decay=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        step(model, opt)
        ema.update()
    before = {k: v.clone() for k, v in ema.averaged_state_dict(dtype="average").items()}
    assert ema.to(dtype=torch.float64) is ema
    sd = ema.averaged_state_dict(dtype="average")
    assert sd["body.weight"].dtype == torch.float64 and sd["bn.num_batches_tracked"].dtype == torch.int64
    for k, v in before.items():
        assert torch.equal(sd[k], v.to(sd[k].dtype))
    ref = {k: v.double().clone() for k, v in sd.items() if v.is_floating_point()}
    for _ in range(3):
        step(model, opt)
        decay = ema.update()
        for k, v in model.state_dict().items():
            if k in ref:
                ref[k] = decay * ref[k] + (1 - decay) * v.double()
    got = ema.averaged_state_dict(dtype="average")
    for k, want in ref.items():
        assert_close(got[k], want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got["bn.num_batches_tracked"], model.bn.num_batches_tracked)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        ema.to(dtype=torch.int32)


def test_model_cast_after_construction_needs_to_and_then_follows():
    model = Net()
    ema = emakit.EMA(model, decay=0.9)
    model.to(torch.float64)
    with pytest.raises(ValueError, match=r"call \.to\(\) on the EMA"):
        ema.update()
    ema.to()  # reads the cast weights; the averages keep their precision
    assert ema.averaged_state_dict(dtype="average")["body.weight"].dtype == torch.float32
    ema.update()
    assert ema.averaged_state_dict()["body.weight"].dtype == torch.float64


def test_model_moved_after_construction_says_what_to_call():
    model = Net()
    ema = emakit.EMA(model, decay=0.9)
    model.to("meta")  # stands in for model.to("cuda") / accelerator.prepare(model) on this CPU machine
    with pytest.raises(ValueError, match=r"Call \.to\('meta'\) on the EMA to move its averages along"):
        ema.update()
    assert ema.num_updates == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_moved_after_construction_follows_with_to():
    model = Net()
    ema = emakit.EMA(model, decay=0.9)
    model.cuda()
    with pytest.raises(ValueError, match="cuda"):
        ema.update()
    ema.to("cuda")
    ema.update()
    assert ema.averaged_state_dict()["body.weight"].is_cuda
    ema.to("cpu")  # averages on the CPU, weights on the GPU
    ema.update()
    assert_close(ema.averaged_state_dict()["body.weight"].cpu(), model.body.weight.detach().cpu(), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- importing averages


@pytest.mark.parametrize(
    "schedule",
    [schedules.warmup(power=2 / 3), schedules.power(sigma_rel=0.1), schedules.start_at(50, schedules.constant(0.9))],
)
def test_import_at_t0_under_a_ramp_raises_instead_of_being_wiped(schedule):
    model = Net()
    imported = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    ema = emakit.EMA(model, schedule=schedule)
    before = {k: v.clone() for k, v in ema.averaged_state_dict().items()}
    with pytest.raises(ValueError, match="next update has decay 0.*pass t="):
        ema.load_averaged_state_dict(imported)
    for k, v in ema.averaged_state_dict().items():
        assert torch.equal(v, before[k])  # unchanged
    ema.load_averaged_state_dict(imported, t=100)
    decay = ema.update()  # the import survives the next update: average = w + decay
    assert decay > 0.5
    assert_close(ema.averaged_state_dict()["head.weight"], model.head.weight.detach() + decay)


def test_import_under_a_constant_decay_needs_no_time():
    model = Net()
    ema = emakit.EMA(model, decay=0.99)
    ema.load_averaged_state_dict(Net().state_dict())
    assert ema.t == 0


def test_key_mismatch_shows_the_keys_and_the_prefix_to_strip():
    model = Net()
    ema = emakit.EMA(model, decay=0.99)
    wrapped = {f"ema_model.{k}": v for k, v in Net().state_dict().items()}
    with pytest.raises(KeyError, match=r"'body.weight' is missing.*start with 'ema_model.': strip it"):
        ema.load_averaged_state_dict(wrapped)
    with pytest.raises(KeyError, match=r"expected keys missing.*first keys given"):
        ema.load_averaged_state_dict({"head.weight": torch.zeros(2, 6)})


def test_key_mismatch_names_every_prefix_that_explains_the_keys():
    ema = emakit.EMA(Net(), decay=0.99)
    sd = Net().state_dict()
    both = {**{f"online_model.{k}": v for k, v in sd.items()}, **{f"ema_model.{k}": v for k, v in sd.items()}}
    with pytest.raises(KeyError, match=r"start with 'online_model.' or 'ema_model.': keep the one that holds"):
        ema.load_averaged_state_dict(both)
