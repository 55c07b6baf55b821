"""EMA and post-hoc EMA on a distributed run: DDP, FSDP2 or DeepSpeed ZeRO-3, on CPUs or GPUs.

    torchrun --standalone --nproc-per-node 2 examples/distributed.py --engine fsdp2
    torchrun --standalone --nproc-per-node 2 examples/distributed.py --engine ddp
    torchrun --standalone --nproc-per-node 2 examples/distributed.py --engine deepspeed   # needs deepspeed

Trains a small regression MLP for ``--steps`` steps with a classic EMA and a PowerEMA,
saves power-EMA snapshots (each rank writes its own shards), evaluates with the EMA weights
swapped in, checkpoints and resumes the EMA with DCP, and finally rebuilds a new EMA length
from the snapshots, distributed (each rank its shards) and offline on rank 0.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import emakit
from emakit import posthoc


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))


def batch(step: int, rank: int, per_rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step * 1000 + rank)  # each rank its own slice of the data
    x = torch.randn(per_rank, 16, generator=g)
    return x.to(device), x.sin().sum(dim=1, keepdim=True).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=("ddp", "fsdp2", "deepspeed"), default="fsdp2")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    args = parser.parse_args()

    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    try:
        train(args, device, dist.get_rank(), dist.get_world_size())
        # Every model, EMA and FSDP object of train() is gone before the group is: tearing gloo down while a
        # rank still holds them can abort the process at exit ("terminate called without an active exception").
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def train(args, device: torch.device, rank: int, world: int) -> None:
    """Train, average, save, resume and rebuild on every rank (the process group is up)."""
    out = Path(args.out or tempfile.mkdtemp(prefix="emakit-dist-")) if rank == 0 else None
    shared = [str(out)]
    dist.broadcast_object_list(shared)  # every rank writes into the same directory
    out = Path(shared[0])

    model = make_model().to(device)
    if args.engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        # shard=True: each rank keeps 1/N of the average (DTensors laid out like FSDP2's).
        ema = emakit.EMA(model, decay=0.95, shard=True)
        pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10), shard=True)
    elif args.engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        ema = emakit.EMA(model, decay=0.95)  # each rank averages its own shards
        pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10))
    else:
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": 32,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 3},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        model, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3), config=config
        )
        ema = emakit.EMA(model, decay=0.95)  # each rank averages its ZeRO-3 partition
        pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10))

    def train_step(step: int) -> float:
        x, y = batch(step, rank, 32, device)
        loss = nn.functional.mse_loss(model(x), y)
        if args.engine == "deepspeed":
            model.backward(loss)
            model.step()
        else:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def eval_loss() -> float:
        x, y = batch(10**6, 0, 256, device)  # the same held-out batch on every rank
        with torch.no_grad():
            return nn.functional.mse_loss(model(x), y).item()

    for step in range(1, args.steps + 1):
        loss = train_step(step)
        ema.update()  # no communication: local shards only
        pema.update()
        if step % (args.steps // 4) == 0:
            pema.save_snapshot(out / "phema")  # collective when sharded: each rank writes its shards
    raw = eval_loss()
    with ema.swapped():  # evaluate with the averaged weights, restored afterwards
        averaged = eval_loss()
    if rank == 0:
        print(f"{args.engine}: {world} ranks, last train loss {loss:.4f}, eval loss raw {raw:.4f}, EMA {averaged:.4f}")

    # Checkpoint and resume the EMA (DCP: each rank writes its part; any world size can load it).
    ema.save(out / f"ema-step{args.steps}")
    resumed = emakit.EMA(model, decay=0.95)
    resumed.load(out / f"ema-step{args.steps}")
    assert resumed.t == ema.t

    # A full, plain state dict of the average on rank 0 only (gathered tensor by tensor).
    full = ema.averaged_state_dict(full=True)
    if rank == 0:
        torch.save(full, out / "ema_full.pt")

    # Post-hoc: another EMA length from the snapshots, distributed (each rank its shards) ...
    if args.engine == "fsdp2":
        sharded = posthoc.reconstruct(
            out / "phema", sigma_rel=0.08, like=model.state_dict(), progress=False
        )
        model.load_state_dict(sharded)  # DTensors straight into the FSDP2 model
        if rank == 0:
            print(f"post-hoc sigma_rel=0.08 (distributed): eval loss {eval_loss():.4f}")
        else:
            eval_loss()
    # ... or offline, in one process with no process group (here: rank 0).
    if rank == 0:
        sd = posthoc.reconstruct(out / "phema", sigma_rel=0.08, progress=False)
        print(f"post-hoc sigma_rel=0.08 (offline): {len(sd)} tensors; outputs in {out}")


if __name__ == "__main__":
    main()
