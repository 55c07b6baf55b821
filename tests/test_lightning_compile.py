"""``EMACallback`` on a LightningModule compiled in place (``module.compile()``): validation and
prediction run the averaged weights, compared with a functional forward of a float64 average
computed here from the recorded trajectory."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

pytest.importorskip("lightning", reason="Lightning is not installed (pip install 'emakit[lightning]')")
import lightning as L  # noqa: E402

from emakit.lightning import EMACallback  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),  # Lightning's pytree use on torch 2.13
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
]

DECAY = 0.8


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(5, 3)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x):
        return self.fc(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def predict_step(self, batch, batch_idx):
        out = self(batch[0])
        self.seen.append((batch[0], out))
        return out

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Trajectory(L.Callback):
    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module):
        self.states.append({k: v.detach().double().clone() for k, v in pl_module.state_dict().items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states.append({k: v.detach().double().clone() for k, v in pl_module.state_dict().items()})


def test_in_place_compiled_module_predicts_with_the_averaged_weights():
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(48, 5, generator=g), torch.randn(48, 3, generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    module = Net()
    module.compile(backend="eager")
    trajectory = Trajectory()
    callback = EMACallback(decay=DECAY, averaged_in=("predict",))
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, max_epochs=1, callbacks=[trajectory, callback],
    )  # fmt: skip
    trainer.fit(module, loader)
    average = trajectory.states[0]
    for state in trajectory.states[1:]:
        average = {k: DECAY * average[k] + (1 - DECAY) * state[k] for k in average}
    trainer.predict(module, loader)
    assert module.seen
    for x, out in module.seen:
        expected = nn.functional.linear(x.double(), average["fc.weight"], average["fc.bias"])
        assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # and the training weights are back afterwards
        assert_close(module.fc.weight.double(), trajectory.states[-1]["fc.weight"], rtol=0, atol=0)
