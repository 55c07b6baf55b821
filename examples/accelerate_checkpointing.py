"""emakit with Hugging Face Accelerate: an EMA saved and resumed by ``accelerator.save_state`` / ``load_state``.

    python examples/accelerate_checkpointing.py                                   # one process
    torchrun --standalone --nproc-per-node 2 examples/accelerate_checkpointing.py           # 2 CPU processes (DDP)
    torchrun --standalone --nproc-per-node 2 examples/accelerate_checkpointing.py --shard   # EMA split 1/2 per rank

Trains a small regression MLP with gradient accumulation (2 batches per optimizer step) and an
EMA updated after each optimizer step. Halfway it saves the whole training state with
``accelerator.save_state`` (model, optimizer, RNG states and the EMA), trains on to the end,
then plays a restart: fresh objects, ``accelerator.load_state``, the second half again. The
resumed run must end exactly where the uninterrupted one did, EMA included, bit for bit.
Runs in seconds on a CPU with generated data (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn

import emakit

EPOCHS = 4  # the restart happens after epoch 2
ACCUMULATE = 2  # batches per optimizer step


def make_data(n: int, seed: int, noise: float = 0.3) -> torch.utils.data.TensorDataset:
    """``y = sin(3x) + noise`` on [-2, 2]: generated, so nothing is downloaded."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g) * 4 - 2
    return torch.utils.data.TensorDataset(x, torch.sin(3 * x) + noise * torch.randn(n, 1, generator=g))


def build(shard: bool, init_seed: int):
    """Everything a training process builds at start; the EMA after ``prepare`` (it reads the prepared model)."""
    # A seedable sampler: each epoch's shuffle depends only on (data_seed, epoch), so a restart replays
    # it (save_state does not store the sampler of a map-style dataset).
    accelerator = Accelerator(
        cpu=True,
        gradient_accumulation_steps=ACCUMULATE,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=0),
    )
    set_seed(init_seed)
    model = nn.Sequential(nn.Linear(1, 64), nn.LayerNorm(64), nn.SiLU(), nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # high on purpose: noisy raw weights
    loader = torch.utils.data.DataLoader(make_data(8192, seed=1), batch_size=32, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    # shard=True (several processes): each rank keeps 1/N of the average.
    ema = emakit.EMA(model, decay=0.98, shard=shard)
    if ema.is_sharded:
        # save_state writes custom objects from the main process only, which would lose the other
        # ranks' parts: every rank saves its own part with DCP, inside the state directory.
        accelerator.register_save_state_pre_hook(lambda models, weights, out: ema.save(Path(out) / "ema"))
        accelerator.register_load_state_pre_hook(lambda models, src: ema.load(Path(src) / "ema"))
    else:
        accelerator.register_for_checkpointing(ema)  # saved as custom_checkpoint_0.pkl
    return accelerator, model, optimizer, loader, ema


def train_epochs(accelerator, model, optimizer, loader, ema, epochs: range) -> None:
    model.train()
    for epoch in epochs:
        loader.set_epoch(epoch)
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)
                optimizer.step()  # a no-op on the batches that only accumulate
                optimizer.zero_grad()
            # One update per optimizer step that ran (not per batch; not after an fp16 overflow skip).
            if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                ema.update()  # t counts optimizer steps


def test_loss(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        loss = nn.functional.mse_loss(model(x), y).item()
    model.train()
    return loss


def ema_state(ema) -> dict[str, torch.Tensor]:
    """Every tensor of the EMA's state (each rank's own part when sharded), copied."""
    state = ema.state_dict()
    tensors = {**state["averages"][0], **{f"copy.{k}": v for k, v in state["copies"].items()}}
    return {k: (v.to_local() if hasattr(v, "to_local") else v).clone() for k, v in tensors.items()}


def uninterrupted(shard: bool, out: Path, test) -> tuple[dict, dict, float]:
    """Train all epochs, saving the state after half of them; returns the final EMA state, weights and time."""
    accelerator, model, optimizer, loader, ema = build(shard, init_seed=0)
    train_epochs(accelerator, model, optimizer, loader, ema, range(0, EPOCHS // 2))
    accelerator.save_state(out)
    train_epochs(accelerator, model, optimizer, loader, ema, range(EPOCHS // 2, EPOCHS))
    raw = test_loss(model, *test)
    with ema.swapped():  # the averaged weights inside, the model's own after
        averaged = test_loss(model, *test)
    accelerator.print(
        f"{accelerator.num_processes} process(es), EMA sharded: {ema.is_sharded}, {int(ema.t)} optimizer steps; "
        f"test loss raw {raw:.4f}, EMA {averaged:.4f}"
    )
    return ema_state(ema), {k: v.clone() for k, v in model.state_dict().items()}, ema.t


def resumed(shard: bool, out: Path, final: tuple[dict, dict, float]) -> bool:
    """A restart: new objects (another init: load_state restores everything), the remaining epochs."""
    accelerator, model, optimizer, loader, ema = build(shard, init_seed=123)
    accelerator.load_state(out)  # model, optimizer, RNG states, and the EMA
    resumed_at = int(ema.t)  # optimizer steps taken when the state was saved
    steps_per_epoch = len(loader) // ACCUMULATE
    train_epochs(accelerator, model, optimizer, loader, ema, range(resumed_at // steps_per_epoch, EPOCHS))

    averages, weights, t = final
    same = ema.t == t and all(torch.equal(v, averages[k]) for k, v in ema_state(ema).items())
    same = same and all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    ok = bool(accelerator.gather(torch.tensor([same])).all())  # every process checked its own part
    accelerator.print(f"resumed at step {resumed_at}, ended at {int(ema.t)}: resumed == uninterrupted: {ok}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shard", action="store_true", help="split the average across processes (EMA(shard=True))")
    parser.add_argument("--out", type=Path, default=None, help="where to save the state (default: a temporary dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    test = make_data(1000, seed=2, noise=0.0).tensors  # the clean function
    state = PartialState(cpu=True)  # the process group, shared by the Accelerators below
    out = [str(args.out or tempfile.mkdtemp(prefix="emakit-accelerate-"))]
    if state.num_processes > 1:
        torch.distributed.broadcast_object_list(out)  # every process saves into the main process's directory
    out = Path(out[0]) / "state"

    final = uninterrupted(args.shard, out, test)
    ok = resumed(args.shard, out, final)
    # Free the DDP models before the process group goes (a rank leaving while another still holds
    # them can abort in teardown), then leave together.
    gc.collect()
    state.wait_for_everyone()
    state.destroy_process_group()
    if not ok:
        raise SystemExit("the resumed run differs from the uninterrupted one")


if __name__ == "__main__":
    main()
