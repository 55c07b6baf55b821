"""Two-rank Lightning runs for tests/test_lightning_distributed.py (imported by the spawned ranks).

Each rank builds its own ``Trainer(devices=2)`` around a process group this module created
(gloo, ``file://`` rendezvous), so Lightning launches nothing. One spawn runs every scenario:

- DDP, replicated average: the reference.
- DDP with ``shard=True`` and FSDP2 (``ModelParallelStrategy``, ``fully_shard`` in
  ``configure_model``): a run straight to step 8, and a run stopped at step 4 then resumed from
  its Lightning checkpoint to step 8, which must agree bit for bit on every rank's shards; the
  straight run's full average must equal the reference.
- DDP with ``shard=True`` and ``checkpoint_weights="averaged"``: stopped and resumed == straight.
"""

from __future__ import annotations

import datetime
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

STEPS = 8
EPOCH = 4  # optimizer steps per epoch: 32 samples, 4 per rank and step
LOCAL_BATCH = 4


def _module_class():
    import lightning as L

    class Tiny(L.LightningModule):
        """Uneven shapes: over 2 ranks ``out.weight`` (1, 3) leaves rank 1 an empty shard.

        The float buffer changes the same way on every rank (FSDP2 does not synchronise
        buffers; BatchNorm statistics would differ per rank).
        """

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.inp = nn.Linear(5, 3)
            self.out = nn.Linear(3, 1)
            self.register_buffer("scale", torch.ones(3))
            self.register_buffer("steps", torch.zeros((), dtype=torch.long))
            self.fsdp = False

        def configure_model(self) -> None:
            if self.fsdp:
                from torch.distributed.fsdp import fully_shard

                mesh = self.device_mesh["data_parallel"]
                fully_shard(self.inp, mesh=mesh)
                fully_shard(self, mesh=mesh)

        def forward(self, x):
            return self.out(torch.tanh(self.inp(x)) * self.scale)

        def training_step(self, batch, batch_idx):
            with torch.no_grad():
                self.scale.mul_(0.9).add_(0.1)
                self.steps.add_(1)
            x, y = batch
            return nn.functional.mse_loss(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self(x), y), sync_dist=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    return Tiny


def _loader(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.randn(n, 5, generator=g), torch.randn(n, 1, generator=g))
    # The same order every epoch: how Lightning re-seeds its own shuffling sampler on resume is not under test.
    sampler = torch.utils.data.DistributedSampler(data, shuffle=False)
    return torch.utils.data.DataLoader(data, batch_size=LOCAL_BATCH, sampler=sampler)


def _fit(tmp: Path, engine: str, max_steps: int, *, shard: bool, ckpt_path=None, checkpoint_weights: str = "raw"):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from emakit.lightning import EMACallback, PowerEMACallback

    if engine == "ddp":
        strategy = DDPStrategy(process_group_backend="gloo")
    else:
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo")
    ema = EMACallback(decay=0.9, shard=shard, checkpoint_weights=checkpoint_weights)
    pema = PowerEMACallback(
        sigma_rels=(0.05, 0.10), shard=shard, time="samples", snapshot_every=16, snapshot_dir=tmp / "phema"
    )
    saver = ModelCheckpoint(dirpath=tmp / "ckpt", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=max_steps,
        callbacks=[ema, pema, saver],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
        default_root_dir=tmp,
        use_distributed_sampler=False,
    )
    model = _module_class()()
    model.fsdp = engine == "fsdp2"
    trainer.fit(model, _loader(2 * LOCAL_BATCH * EPOCH, 1), _loader(2 * LOCAL_BATCH, 2), ckpt_path=ckpt_path)
    return ema, pema


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if type(t).__name__ == "DTensor" else t


def _assert_same_state(a, b, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert (a.t, a.num_updates) == (b.t, b.num_updates), (what, a.t, b.t)
    for k, (pa, pb) in enumerate(zip(sa["averages"], sb["averages"])):
        for name in pa:
            assert torch.equal(_local(pa[name]), _local(pb[name])), f"{what}: averages[{k}][{name}] differs"
    for name in sa["copies"]:
        assert torch.equal(_local(sa["copies"][name]), _local(sb["copies"][name])), f"{what}: copies[{name}]"


def scenario(rank: int, world: int, tmp: Path) -> None:
    from emakit.lightning import EMACallback

    out: dict = {}
    # The reference: DDP, replicated averages.
    ref_ema, ref_pema = _fit(tmp / "ddp_ref", "ddp", STEPS, shard=False)
    reference = ref_ema.ema.averaged_state_dict()
    assert not ref_ema.ema.is_sharded and ref_ema.ema.t == STEPS and ref_pema.ema.t == STEPS * 2 * LOCAL_BATCH
    out["reference"] = {k: v.clone() for k, v in reference.items()}

    for engine in ("ddp", "fsdp2"):
        shard = engine == "ddp"  # FSDP2 averages are sharded anyway
        straight = _fit(tmp / f"{engine}_straight", engine, STEPS, shard=shard)
        _fit(tmp / f"{engine}_stopped", engine, EPOCH, shard=shard)
        ckpt = tmp / f"{engine}_stopped" / "ckpt" / f"epoch=0-step={EPOCH}.ckpt"
        resumed = _fit(tmp / f"{engine}_stopped", engine, STEPS, shard=shard, ckpt_path=ckpt)
        if engine == "ddp":
            ddp_straight = straight
        for a, b, what in zip(resumed, straight, ("EMA", "PowerEMA")):
            assert a.ema.is_sharded, (engine, what)
            _assert_same_state(a.ema, b.ema, f"{engine} {what} resumed vs straight")
        full = straight[0].ema.averaged_state_dict(full=True)  # collective; plain tensors on rank 0
        if rank == 0:
            diffs = {k: (full[k].double() - reference[k].double()).abs().max().item() for k in reference}
            out[f"{engine}_max_diff"] = max(diffs.values())
            assert out[f"{engine}_max_diff"] < 1e-5, (engine, diffs)
            assert torch.equal(full["steps"], reference["steps"])

    # DDP with shard=True and the average as the checkpoint's state_dict (gathered to rank 0, which
    # writes the file): resuming restores the raw weights and continues exactly.
    _fit(tmp / "ddp_averaged", "ddp", EPOCH, shard=True, checkpoint_weights="averaged")
    ckpt = tmp / "ddp_averaged" / "ckpt" / f"epoch=0-step={EPOCH}.ckpt"
    resumed = _fit(tmp / "ddp_averaged", "ddp", STEPS, shard=True, ckpt_path=ckpt, checkpoint_weights="averaged")
    _assert_same_state(resumed[0].ema, ddp_straight[0].ema, "DDP checkpoint_weights='averaged' resumed vs straight")

    # Deployment checkpoints of a sharded model are refused when fitting starts, on every rank alike.
    try:
        _fit(tmp / "fsdp2_averaged", "fsdp2", 1, shard=False, checkpoint_weights="averaged")
    except ValueError as error:
        assert "checkpoint_weights='averaged' needs a model whose checkpoint holds plain tensors" in str(error)
    else:
        raise AssertionError("checkpoint_weights='averaged' was accepted on an FSDP2 model")
    assert EMACallback  # imported in the rank, as users would
    if rank == 0:
        torch.save(out, tmp / "results.pt")


# --------------------------------------------------------------------------- running ranks


def run(world: int, tmp: str, timeout: float = 150.0) -> None:
    """Run :func:`scenario` on ``world`` CPU ranks; raise if a rank failed or time ran out."""
    ctx = mp.start_processes(_entry, args=(world, tmp), nprocs=world, join=False, start_method="spawn")
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    while not ctx.join(timeout=1.0):
        if datetime.datetime.now() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"the 2-rank Lightning scenario did not finish within {timeout} s")


def _entry(rank: int, world: int, tmp: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    # Lightning sees processes it did not launch (LOCAL_RANK) and reuses the process group below.
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/rendezvous",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        import warnings

        warnings.filterwarnings("ignore")  # Lightning's advice on workers, pytree deprecations
        scenario(rank, world, Path(tmp))
        import gc

        gc.collect()
        dist.barrier()
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()
