"""emakit with Lightning: ``EMACallback`` averages the weights of the LightningModule being trained.

    python examples/lightning_callback.py

A small regression network with BatchNorm, trained on CPU with a deliberately high learning
rate (noisy raw weights) and gradient accumulation. The callback updates the average after
each optimizer step (not after each batch), runs validation with the averaged weights, and
stores the average in the Lightning checkpoint. At the end the script validates both ways
and prints the two losses. Runs in seconds; the data is generated (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from emakit.lightning import EMACallback


class Regressor(L.LightningModule):
    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(1, 64), nn.BatchNorm1d(64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1)
        )
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)  # high on purpose: noisy raw weights


def data(n: int, seed: int, noise: float) -> torch.utils.data.TensorDataset:
    """``y = sin(3x) + noise`` on [-2, 2]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g) * 4 - 2
    return torch.utils.data.TensorDataset(x, torch.sin(3 * x) + noise * torch.randn(n, 1, generator=g))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="checkpoint directory (default: a temporary one)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning 2.6 on torch 2.13's pytree
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    train = torch.utils.data.DataLoader(data(8192, seed=1, noise=0.3), batch_size=32, shuffle=True)
    val = torch.utils.data.DataLoader(data(1000, seed=2, noise=0.0), batch_size=500)  # the clean function

    ema = EMACallback(decay=0.98)  # validation, test and predict use the average by default
    out = args.out or Path(tempfile.mkdtemp(prefix="emakit-lightning-"))
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=4,
        accumulate_grad_batches=2,  # one EMA update per optimizer step, every 2 batches
        callbacks=[ema, ModelCheckpoint(dirpath=out)],  # the checkpoint holds the EMA's state
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Regressor()
    trainer.fit(model, train, val)
    print(f"{trainer.global_step} optimizer steps ({4 * len(train)} batches); EMA t = {ema.ema.t}")

    averaged = trainer.validate(model, val, verbose=False)[0]["val_loss"]  # inside ema.ema.swapped()
    ema.averaged_in = ()  # per stage: validate with the raw weights now
    raw = trainer.validate(model, val, verbose=False)[0]["val_loss"]
    print(f"validation loss: raw weights {raw:.4f}, EMA weights {averaged:.4f}")

    # For deployment: the averaged weights as a plain state dict (keys of the LightningModule).
    torch.save(ema.ema.averaged_state_dict(), out / "model_ema.pt")
    print(f"checkpoint and averaged weights in {out}")


if __name__ == "__main__":
    main()
