"""emakit.migrate side by side with the real peers: same model, same weights, same numbers.

Each test trains a small model with BatchNorm for 320 optimizer steps and, after every step,
updates the peer and the EMA from ``migrate.ema_like`` the way their docs say, then compares
every float tensor the peer averages at fp32 tolerances (after every step, so an off-by-one
anywhere shows). Integer buffers are where emakit deliberately differs: it copies
``num_batches_tracked``; the tests assert the peer's wrong count next to the right one.

The peers are optional (``bash .ci/peers`` installs them); each test skips when its peer is
missing. torch's AveragedModel is always there. timm cannot be installed here (its import
needs torchvision): its rule is checked against its source in ``tests/test_migrate.py``.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from emakit import migrate

pytestmark = [
    pytest.mark.peers,
    pytest.mark.filterwarnings("ignore::UserWarning"),  # the peers' advice (num_workers, deprecations)
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),  # Lightning on torch 2.13's pytree
]

STEPS = 320
PARAMS = ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias")
FLOAT_BUFFERS = ("1.running_mean", "1.running_var")
COUNT = "1.num_batches_tracked"


def require(module: str, package: str):
    """The peer's module, or a skip saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.skip(f"{package} is not installed (optional; run bash .ci/peers)")


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def train(model: nn.Module, after_step, steps: int = STEPS) -> None:
    """SGD with momentum on random regression data; ``after_step(n)`` after optimizer step ``n``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    model.train()
    for n in range(1, steps + 1):
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        after_step(n)


class Worst:
    """Compares tensors at fp32 tolerances and keeps the largest absolute difference seen."""

    def __init__(self) -> None:
        self.diff = 0.0

    def check(self, ours: dict, theirs: dict, names, step: int) -> None:
        for name in names:
            assert_close(ours[name], theirs[name], msg=lambda m, name=name: f"{name} after step {step}: {m}")
            self.diff = max(self.diff, (ours[name] - theirs[name]).abs().max().item())


def truncated_count(decay: float, counts: list[int]) -> int:
    """The count AveragedModel holds when it averages an integer buffer: the float EMA, truncated each time."""
    ema = torch.tensor(counts[0])  # the first update copies
    for count in counts[1:]:
        ema.copy_(decay * ema + (1 - decay) * torch.tensor(count))  # into int64: truncated
    return ema.item()


# --------------------------------------------------------------------------- diffusers


@pytest.mark.parametrize(
    "kwargs",
    [
        {"decay": 0.999},  # no warm-up: still the (1 + s) / (10 + s) ramp
        {"decay": 0.999, "update_after_step": 10, "min_decay": 0.5},
        {"decay": 0.995, "update_after_step": 5, "use_ema_warmup": True, "inv_gamma": 2.0, "power": 0.75},
    ],
)
def test_diffusers_ema_model(kwargs):
    EMAModel = require("diffusers.training_utils", "diffusers").EMAModel
    model = make_model()
    names = [n for n, _ in model.named_parameters()]
    peer = EMAModel(model.parameters(), **kwargs)
    ours = migrate.ema_like("diffusers", model, **kwargs)
    worst = Worst()

    def after_step(n):
        peer.step(model.parameters())
        assert ours.update() == peer.cur_decay_value  # the same float, step by step
        worst.check(ours.averaged_state_dict(), dict(zip(names, peer.shadow_params)), names, n)

    train(model, after_step)
    assert peer.optimization_step == ours.t == STEPS
    assert ours.averaged_state_dict()[COUNT].item() == STEPS  # buffers are not diffusers': read from the model
    print(f"diffusers {kwargs}: max abs diff {worst.diff:.2e}")


def test_diffusers_given_the_module_warms_up_even_when_told_not_to():
    EMAModel = require("diffusers.training_utils", "diffusers").EMAModel
    model = make_model()
    names = [n for n, _ in model.named_parameters()]
    with pytest.warns(FutureWarning, match="deprecated"):
        peer = EMAModel(model, decay=0.999, use_ema_warmup=False)
    assert peer.use_ema_warmup is True
    ours = migrate.ema_like("diffusers", model, decay=0.999, use_ema_warmup=True)  # what the peer really does
    worst = Worst()

    def after_step(n):
        peer.step(model.parameters())
        assert ours.update() == peer.cur_decay_value
        worst.check(ours.averaged_state_dict(), dict(zip(names, peer.shadow_params)), names, n)

    train(model, after_step)
    print(f"diffusers given the module: max abs diff {worst.diff:.2e}")


# --------------------------------------------------------------------------- ema-pytorch


@pytest.mark.parametrize(
    ("kwargs", "every_step"),
    [
        ({}, True),  # beta 0.9999, update_after_step 100, update_every 10
        ({"beta": 0.99, "update_after_step": 100, "update_every": 10, "power": 0.75}, False),
        ({"beta": 0.95, "update_after_step": 0, "update_every": 1, "inv_gamma": 3.0, "min_value": 0.5}, True),
        ({"beta": 0.99, "update_after_step": 37, "update_every": 7}, False),
    ],
)
def test_ema_pytorch_ema(kwargs, every_step):
    EMA = require("ema_pytorch", "ema-pytorch").EMA
    model = make_model()
    peer = EMA(model, include_online_model=False, **kwargs)
    ours = migrate.ema_like("ema_pytorch", model, **kwargs)
    every = kwargs.get("update_every", 10)
    worst = Worst()
    last_update = 0

    def after_step(n):
        nonlocal last_update
        peer.update()
        peer_updates = (n - 1) % every == 0
        if every_step:
            decay = ours.update()
        elif peer_updates:
            decay = ours.update(t=n)  # only where ema-pytorch updates
        if peer_updates:
            last_update = n
            if n - 1 > kwargs.get("update_after_step", 100):  # ema-pytorch computes this decay in float32
                assert decay == pytest.approx(peer.get_current_decay(), rel=1e-6)
        worst.check(ours.averaged_state_dict(), peer.ema_model.state_dict(), PARAMS + FLOAT_BUFFERS, n)

    train(model, after_step)
    assert peer.step.item() == STEPS
    # ema-pytorch never updates integer buffers: its count stays at the construction-time 0.
    assert peer.ema_model.state_dict()[COUNT].item() == 0
    assert ours.averaged_state_dict()[COUNT].item() == (STEPS if every_step else last_update)
    print(f"ema_pytorch {kwargs}, every_step={every_step}: max abs diff {worst.diff:.2e}")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sigma_rel": 0.05, "update_every": 10},
        {"sigma_rel": 0.10, "update_every": 1},
        {"gamma": 3.0, "update_every": 100},  # KarrasEMA's default update_every
    ],
)
def test_ema_pytorch_karras_ema(kwargs):
    KarrasEMA = require("ema_pytorch", "ema-pytorch").KarrasEMA
    model = make_model()
    peer = KarrasEMA(model, **kwargs)
    ours = migrate.ema_like("ema_pytorch_karras", model, **kwargs)
    worst = Worst()

    def after_step(n):
        peer.update()
        ours.update()
        worst.check(ours.averaged_state_dict(), peer.ema_model.state_dict(), PARAMS + FLOAT_BUFFERS, n)

    train(model, after_step)
    assert peer.ema_model.state_dict()[COUNT].item() == 0  # never updated
    assert ours.averaged_state_dict()[COUNT].item() == STEPS
    print(f"ema_pytorch_karras {kwargs}: max abs diff {worst.diff:.2e}")


def test_ema_pytorch_excluded_names():
    EMA = require("ema_pytorch", "ema-pytorch").EMA
    model = make_model()
    kwargs = {
        "beta": 0.99,
        "update_after_step": 5,
        "update_every": 1,
        "param_or_buffer_names_no_ema": {"1.running_var"},
    }
    kwargs |= {"ignore_startswith_names": {"3."}}
    peer = EMA(model, include_online_model=False, **kwargs)
    ours = migrate.ema_like("ema_pytorch", model, **kwargs)
    worst = Worst()
    ignored_at_last_copy = {}

    def after_step(n):
        peer.update()
        ours.update()
        if n - 1 <= 5:  # ema-pytorch's copies also copy the ignored names
            ignored_at_last_copy.update({k: v.clone() for k, v in model.state_dict().items() if k.startswith("3.")})
        theirs, mine = peer.ema_model.state_dict(), ours.averaged_state_dict()
        worst.check(mine, theirs, ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"), n)
        for name in ("3.weight", "3.bias"):
            assert torch.equal(theirs[name], ignored_at_last_copy[name])  # frozen at the last copy
            assert torch.equal(mine[name], model.state_dict()[name])  # emakit reads them from the model

    train(model, after_step)
    print(f"ema_pytorch excluded names: max abs diff {worst.diff:.2e}")


# --------------------------------------------------------------------------- torch-ema


@pytest.mark.parametrize("kwargs", [{"decay": 0.99}, {"decay": 0.995, "use_num_updates": False}])
def test_torch_ema(kwargs):
    ExponentialMovingAverage = require("torch_ema", "torch-ema").ExponentialMovingAverage
    model = make_model()
    names = [n for n, _ in model.named_parameters()]
    peer = ExponentialMovingAverage(model.parameters(), **kwargs)
    ours = migrate.ema_like("torch_ema", model, **kwargs)  # built where the peer is: its first update keeps some
    worst = Worst()

    def after_step(n):
        peer.update()
        ours.update()
        worst.check(ours.averaged_state_dict(), dict(zip(names, peer.shadow_params)), names, n)

    train(model, after_step)
    assert ours.t == STEPS and (not kwargs.get("use_num_updates", True) or peer.num_updates == STEPS)
    assert ours.averaged_state_dict()[COUNT].item() == STEPS  # buffers are not torch-ema's: read from the model
    print(f"torch_ema {kwargs}: max abs diff {worst.diff:.2e}")


# --------------------------------------------------------------------------- torch AveragedModel


@pytest.mark.parametrize(
    ("use_buffers", "decay", "their_count"),
    [
        (False, 0.99, STEPS),  # buffers copied at each update: right
        # use_buffers=True runs the float EMA on the count and truncates it: it moves only once the
        # gap reaches about 1 / (1 - decay) batches, 99 at 0.99 ...
        (True, 0.99, 221),
        # ... and never within 1000 steps at 0.999: stuck at the first copy (mission.md).
        (True, 0.999, 1),
    ],
)
def test_averaged_model(use_buffers, decay, their_count):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = make_model()
    peer = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=use_buffers)
    ours = migrate.ema_like("averaged_model", model, decay=decay, use_buffers=use_buffers)
    worst = Worst()

    def after_step(n):
        peer.update_parameters(model)
        ours.update()
        worst.check(ours.averaged_state_dict(), peer.module.state_dict(), PARAMS + FLOAT_BUFFERS, n)

    train(model, after_step)
    assert peer.n_averaged.item() == ours.t == STEPS
    theirs, mine = peer.module.state_dict()[COUNT].item(), ours.averaged_state_dict()[COUNT].item()
    assert mine == model[1].num_batches_tracked.item() == STEPS
    assert theirs == their_count
    if use_buffers:
        assert theirs == truncated_count(decay, list(range(1, STEPS + 1)))
    print(
        f"averaged_model use_buffers={use_buffers} decay={decay}: max abs diff {worst.diff:.2e}, count {theirs} vs {mine}"
    )


# --------------------------------------------------------------------------- Lightning


def _lightning_run(kwargs: dict, accumulate: int):
    """Fits a tiny LightningModule with the peer's callback and an emakit one after it; returns both."""
    L = require("lightning", "lightning")
    from lightning.pytorch.callbacks import EMAWeightAveraging

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    class EmakitSide(L.Callback):
        """Updates the emakit EMA whenever an optimizer step happened and checks it against the peer."""

        def __init__(self, peer: EMAWeightAveraging) -> None:
            self.peer, self.ema, self.worst, self.count = peer, None, Worst(), None

        def setup(self, trainer, pl_module, stage):
            self.ema = migrate.ema_like("lightning", pl_module, **kwargs)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step > self.ema.t:  # an optimizer step happened (gradient accumulation)
                self.ema.update(t=trainer.global_step)
                theirs = {k.removeprefix("net."): v for k, v in self.peer._average_model.module.state_dict().items()}
                mine = {k.removeprefix("net."): v for k, v in self.ema.averaged_state_dict().items()}
                averaged = PARAMS + FLOAT_BUFFERS
                self.worst.check(mine, theirs, averaged, trainer.global_step)
                self.count = (theirs[COUNT].item(), mine[COUNT].item(), pl_module.net[1].num_batches_tracked.item())

    g = torch.Generator().manual_seed(1)
    batches = STEPS * accumulate
    data = torch.utils.data.TensorDataset(
        torch.randn(batches * 16, 6, generator=g), torch.randn(batches * 16, 3, generator=g)
    )
    peer = EMAWeightAveraging(**kwargs)
    side = EmakitSide(peer)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        accumulate_grad_batches=accumulate,
        callbacks=[peer, side],  # the emakit side runs after the peer's update
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=16))
    assert trainer.global_step == side.ema.t == STEPS
    return peer, side


def test_lightning_ema_weight_averaging():
    peer, side = _lightning_run({"decay": 0.95}, accumulate=1)
    theirs, mine, model_count = side.count
    # Lightning averages the count with decay 0.95 and truncates it: it moves only once the gap
    # reaches 1 / (1 - 0.95) = 20 batches, so it trails by 20: 300 where 320 is right (after 80
    # steps, 60 where 80 is right, as mission.md measured). emakit copies it.
    assert model_count == mine == STEPS
    assert theirs == truncated_count(0.95, list(range(1, STEPS + 1))) == 300
    assert truncated_count(0.95, list(range(1, 81))) == 60
    print(f"lightning decay=0.95: max abs diff {side.worst.diff:.2e}, count {theirs} vs {mine}")


def test_lightning_every_n_steps_starting_late_with_accumulation():
    kwargs = {"decay": 0.99, "update_every_n_steps": 10, "update_starting_at_step": 95}
    peer, side = _lightning_run(kwargs, accumulate=2)
    theirs, mine, model_count = side.count
    assert model_count == mine == 2 * STEPS  # emakit: updated after every optimizer step, count copied
    # Lightning updates after optimizer steps 101, 111, ..., 311 (step_idx 100, 110, ...), when the
    # model has seen 2 batches per step; its truncated average of the count ends at 236, not 622.
    assert theirs == truncated_count(0.99, [2 * n for n in range(101, STEPS + 1, 10)]) == 236
    print(f"lightning {kwargs}: max abs diff {side.worst.diff:.2e}, count {theirs} vs {mine}")
