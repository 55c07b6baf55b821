"""``migrate.load`` on checkpoints written by the real peers: same weights, same step count.

For each installed peer (diffusers ``EMAModel``, ema-pytorch ``EMA`` / ``KarrasEMA`` /
``PostHocEMA`` snapshots, torch-ema, torch's ``AveragedModel``, Lightning's
``EMAWeightAveraging`` with a real ``Trainer``), a few dozen training steps update the
peer's EMA as its docs say, its checkpoint is saved the way its users save it, and
``migrate.load`` must give an emakit EMA holding exactly the peer's averaged weights, with
``t`` equal to the peer's step count and the right source detected. Run with
``bash .ci/peers``; each test is skipped when its peer is absent.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import emakit
from emakit._peers.checkpoints import load

pytestmark = pytest.mark.peers

STEPS = 40


def needs(module: str, name: str):
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None, reason=f"{name} is not installed (optional; run bash .ci/peers)"
    )


def _layers(module: nn.Module) -> None:
    """Float parameters, a frozen one (``head.bias``), BatchNorm statistics and an integer buffer."""
    module.fc = nn.Linear(4, 6)
    module.bn = nn.BatchNorm1d(6)
    module.head = nn.Linear(6, 3)
    module.head.bias.requires_grad_(False)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        _layers(self)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.fc(x))))


def train(model: nn.Module, after_step, steps: int = STEPS) -> None:
    gen = torch.Generator().manual_seed(7)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 4, generator=gen)).square().mean().backward()
        opt.step()
        after_step()


def assert_loaded(ema, expected: dict[str, torch.Tensor], names=None, live: dict | None = None) -> None:
    """The EMA's averaged and copied tensors equal ``expected`` (by name), exactly; and differ from ``live``."""
    got = ema.averaged_state_dict(dtype="average")
    if live is not None:  # the average, not the live weights beside it in the checkpoint
        assert not torch.equal(got["fc.weight"], live["fc.weight"].to(got["fc.weight"].dtype))
    names = [*ema._spec.average, *ema._spec.copy] if names is None else names
    assert names
    for name in names:
        assert_close(got[name], expected[name].to(got[name].dtype), rtol=0, atol=0, msg=name)


def model_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_buffers())


# --------------------------------------------------------------------------- diffusers


def _diffusers_net():
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config

    class DiffNet(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, width: int = 6) -> None:
            super().__init__()
            _layers(self)

        def forward(self, x):
            return self.head(torch.relu(self.bn(self.fc(x))))

    return DiffNet


@needs("diffusers", "diffusers")
def test_diffusers_ema_model_state_dict(tmp_path):
    from diffusers.training_utils import EMAModel

    model = Net()
    peer = EMAModel(model.parameters(), decay=0.99)  # all parameters, as diffusers' training scripts do
    train(model, lambda: peer.step(model.parameters()))
    torch.save(peer.state_dict(), tmp_path / "ema.pt")  # what accelerate's register_for_checkpointing writes

    ema = emakit.EMA(model, decay=0.99)
    with pytest.warns(UserWarning, match="took 3 buffers from the model"):
        assert load(ema, tmp_path / "ema.pt") == "diffusers"
    shadow = dict(zip((n for n, _ in model.named_parameters()), peer.shadow_params))
    assert_loaded(ema, {**shadow, **model_buffers(model)}, live=model.state_dict())
    assert ema.t == peer.optimization_step == STEPS


@needs("diffusers", "diffusers")
def test_diffusers_save_pretrained_folder(tmp_path):
    from diffusers.training_utils import EMAModel

    DiffNet = _diffusers_net()
    model = DiffNet()
    peer = EMAModel(model.parameters(), decay=0.99, model_cls=DiffNet, model_config=model.config)
    train(model, lambda: peer.step(model.parameters()))
    peer.save_pretrained(tmp_path / "unet_ema")  # diffusers' train_*.py save_model_hook

    ema = emakit.EMA(model, decay=0.99)
    with pytest.warns(UserWarning, match=r"save_pretrained folder averages parameters only.*took 3 buffers"):
        assert load(ema, tmp_path / "unet_ema") == "diffusers"
    shadow = dict(zip((n for n, _ in model.named_parameters()), peer.shadow_params))
    assert_loaded(ema, {**shadow, **model_buffers(model)}, live=model.state_dict())
    assert ema.t == STEPS
    # The folder's buffers are a fresh model's, not the trained ones: why they come from the model.
    reloaded = DiffNet.from_pretrained(tmp_path / "unet_ema")
    assert torch.equal(reloaded.bn.running_var, torch.ones(6))
    assert not torch.equal(model.bn.running_var, torch.ones(6))


# --------------------------------------------------------------------------- ema-pytorch


@needs("ema_pytorch", "ema-pytorch")
def test_ema_pytorch_ema(tmp_path):
    from ema_pytorch import EMA

    model = Net()
    peer = EMA(model, beta=0.99, update_after_step=5, update_every=1)
    train(model, peer.update)
    torch.save(peer.state_dict(), tmp_path / "ema.pt")

    ema = emakit.EMA(model, decay=0.99)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load(ema, tmp_path / "ema.pt") == "ema_pytorch"
    assert_loaded(ema, peer.ema_model.state_dict(), live=model.state_dict())
    assert ema.t == peer.step.item() == STEPS


@needs("ema_pytorch", "ema-pytorch")
def test_ema_pytorch_karras_ema(tmp_path):
    from ema_pytorch import KarrasEMA

    model = Net()
    peer = KarrasEMA(model, sigma_rel=0.1, update_every=1)
    train(model, peer.update)
    torch.save(peer.state_dict(), tmp_path / "karras.pt")

    ema = emakit.EMA(model, decay=0.99)
    assert load(ema, tmp_path / "karras.pt", source="ema_pytorch") == "ema_pytorch"
    assert_loaded(ema, peer.ema_model.state_dict(), live=model.state_dict())
    assert ema.t == peer.step.item() == STEPS


@needs("ema_pytorch", "ema-pytorch")
@pytest.mark.filterwarnings("ignore:EMA.load_averaged_state_dict. averages stored as torch.float16")
def test_ema_pytorch_posthoc_snapshot_file(tmp_path):
    from ema_pytorch import PostHocEMA

    model = Net()
    peer = PostHocEMA(
        model, sigma_rels=(0.05, 0.10), update_every=1, checkpoint_every_num_steps=20, checkpoint_folder=str(tmp_path)
    )
    train(model, peer.update)
    path = tmp_path / f"1.{STEPS}.pt"
    assert path.is_file()

    ema = emakit.EMA(model, decay=0.99)
    assert load(ema, path) == "ema_pytorch"
    stored = torch.load(path, weights_only=True)
    assert_loaded(ema, {k.removeprefix("ema_model."): v for k, v in stored.items()})
    fp16 = {k: v.to(torch.float16) for k, v in peer.ema_models[1].ema_model.state_dict().items()}
    assert_loaded(ema, fp16)  # the snapshot taken at the last step is the peer's EMA, in fp16
    assert ema.t == STEPS


# --------------------------------------------------------------------------- torch-ema


@needs("torch_ema", "torch-ema")
def test_torch_ema(tmp_path):
    from torch_ema import ExponentialMovingAverage

    model = Net()
    peer = ExponentialMovingAverage(model.parameters(), decay=0.99)
    train(model, peer.update)
    torch.save(peer.state_dict(), tmp_path / "ema.pt")

    ema = emakit.EMA(model, decay=0.99)
    with pytest.warns(UserWarning, match="took 3 buffers from the model"):
        assert load(ema, tmp_path / "ema.pt") == "torch_ema"
    shadow = dict(zip((n for n, _ in model.named_parameters()), peer.shadow_params))
    assert_loaded(ema, {**shadow, **model_buffers(model)}, live=model.state_dict())
    assert ema.t == peer.num_updates == STEPS


# --------------------------------------------------------------------------- torch AveragedModel


def test_averaged_model(tmp_path):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = Net()
    peer = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99), use_buffers=True)
    train(model, lambda: peer.update_parameters(model))
    torch.save(peer.state_dict(), tmp_path / "swa.pt")

    ema = emakit.EMA(model, decay=0.99)
    assert load(ema, tmp_path / "swa.pt") == "averaged_model"
    assert_loaded(ema, peer.module.state_dict(), live=model.state_dict())
    assert ema.t == peer.n_averaged.item() == STEPS


# --------------------------------------------------------------------------- Lightning


def _lightning_module():
    import lightning as L

    class LitNet(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            _layers(self)

        def forward(self, x):
            return self.head(torch.relu(self.bn(self.fc(x))))

        def training_step(self, batch, batch_idx):
            (x,) = batch
            return self(x).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05, momentum=0.9)

    return L, LitNet


@needs("lightning", "lightning")
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # Lightning 2.6 on torch 2.13's pytree
def test_lightning_ema_weight_averaging(tmp_path):
    L, LitNet = _lightning_module()
    from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

    data = torch.utils.data.TensorDataset(torch.randn(8 * STEPS, 4, generator=torch.Generator().manual_seed(3)))
    module = LitNet()
    averaging = EMAWeightAveraging(decay=0.99)
    saver = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        callbacks=[averaging, saver],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    assert trainer.global_step == STEPS
    path = tmp_path / "last.ckpt"
    assert path.is_file()

    ema = emakit.EMA(LitNet(), decay=0.99)
    assert load(ema, path) == "lightning"
    live = torch.load(path, weights_only=True)["current_model_state"]
    assert_loaded(ema, averaging._average_model.module.state_dict(), live=live)
    assert ema.t == trainer.global_step == STEPS
