"""A timm-style training loop with emakit: evaluate the EMA as a module, keep the best checkpoints.

What timm's ``train.py`` does with ``ModelEmaV3`` and ``CheckpointSaver``, without importing
timm: the EMA is evaluated through ``ema.averaged_module()`` (timm's ``model_ema.module``),
each epoch's checkpoint holds ``state_dict`` and ``state_dict_ema`` (the keys timm writes,
so timm's tools and ``emakit.migrate.load`` read them), the ``max_history`` best by the EMA's
validation loss are kept, ``last.pth.tar`` is always written, ``model_best.pth.tar`` is the
best one. The emakit state (time, counters) rides along under ``emakit_ema`` so that resuming
is exact; the checkpoint is written to a temporary name and renamed.

    python examples/timm_style.py [--epochs 6] [--out /tmp/timm_style]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

import emakit
from emakit import migrate


def data(seed: int, n: int = 2048):
    """A noisy 3-class problem on 16 features (generated, nothing downloaded)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=gen)
    w = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    y = (x @ w + 0.8 * torch.randn(n, 3, generator=gen)).argmax(1)
    return x, y


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 3))


@torch.no_grad()
def evaluate(module: nn.Module, x, y) -> float:
    return nn.functional.cross_entropy(module(x), y).item()


class CheckpointSaver:
    """Keeps the ``max_history`` best checkpoints by a metric (lower is better), plus last and best."""

    def __init__(self, directory: Path, max_history: int = 2) -> None:
        self.directory = directory
        self.max_history = max_history
        self.kept: list[tuple[float, Path]] = []
        directory.mkdir(parents=True, exist_ok=True)

    def save(self, checkpoint: dict, epoch: int, metric: float) -> None:
        last = self.directory / "last.pth.tar"
        _save_atomic(checkpoint, last)
        path = self.directory / f"checkpoint-{epoch}.pth.tar"
        if len(self.kept) < self.max_history or metric < self.kept[-1][0]:
            shutil.copyfile(last, path)
            self.kept = sorted([*self.kept, (metric, path)])
            for _, old in self.kept[self.max_history :]:
                old.unlink()
            self.kept = self.kept[: self.max_history]
            shutil.copyfile(self.kept[0][1], self.directory / "model_best.pth.tar")


def _save_atomic(obj: dict, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(out: Path, epochs: int, resume: bool = False) -> tuple[nn.Module, emakit.EMA, list[float]]:
    torch.manual_seed(0)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # timm's default warm-up EMA (ModelEmaV3(decay=0.998, use_warmup=True)), the same numbers.
    ema = migrate.ema_like("timm", model, decay=0.998, use_warmup=True)
    saver = CheckpointSaver(out)
    x, y = data(1)
    xv, yv = data(2, 1024)
    start = 0
    if resume:
        ckpt = torch.load(out / "last.pth.tar", weights_only=True)
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        ema.load_state_dict(ckpt["emakit_ema"])
        start = ckpt["epoch"] + 1
    teacher = ema.averaged_module()  # timm's model_ema.module: always the current average
    history = []
    for epoch in range(start, epochs):
        gen = torch.Generator().manual_seed(100 + epoch)
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ema.update()
        model.eval()
        raw, averaged = evaluate(model, xv, yv), evaluate(teacher, xv, yv)
        history.append(averaged)
        print(f"epoch {epoch}: val loss raw {raw:.4f}, EMA {averaged:.4f} (t={ema.t:g})")
        checkpoint = {
            "epoch": epoch,
            "state_dict": model.state_dict(),
            "state_dict_ema": teacher.state_dict(),  # the plain model's keys, like timm's
            "optimizer": optimizer.state_dict(),
            "emakit_ema": ema.state_dict(),
        }
        saver.save(checkpoint, epoch, averaged)
    return model, ema, history


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "timm_style"
        _, ema, _ = train(out, args.epochs)
        kept = sorted(p.name for p in out.glob("checkpoint-*.pth.tar"))
        print(f"kept {kept} + last.pth.tar + model_best.pth.tar")
        # Stop after half the epochs, resume from last.pth.tar: the same EMA as one run.
        half = out.with_name("timm_style_resumed")
        train(half, args.epochs // 2)
        _, resumed, _ = train(half, args.epochs, resume=True)
        same = all(
            torch.equal(a, b)
            for a, b in zip(ema.state_dict()["averages"][0].values(), resumed.state_dict()["averages"][0].values())
        )
        print(f"resumed at epoch {args.epochs // 2}: EMA identical to one run: {same}")
        # timm's own layout loads anywhere: here into a fresh EMA with emakit.migrate.load.
        fresh = migrate.ema_like("timm", make_model(), decay=0.998, use_warmup=True)
        best = out / "model_best.pth.tar"
        migrate.load(fresh, best, t=torch.load(best, weights_only=True)["emakit_ema"]["t"])
        print(f"model_best.pth.tar loaded with migrate.load as timm, t={fresh.t:g}")


if __name__ == "__main__":
    main()
