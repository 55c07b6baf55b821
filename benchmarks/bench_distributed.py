"""Per-rank EMA memory and update time on a sharded model: shard-local vs gather-every-step.

Ranks are CPU processes (gloo, one thread each) on this machine. The model is a stack of
``Linear(width, width)`` layers, FSDP2-sharded over the ranks (``fully_shard`` per layer).
Contenders, timed round-robin, CPU-time medians per rank (rank 0 reported):

- ``emakit EMA (FSDP2)``: each rank averages its own shards, no communication;
- ``gather + replicated EMA``: what peers do on a sharded model: gather every full
  parameter each step (``full_tensor()``), then ``lerp_`` a full EMA held on every rank;
- ``emakit EMA (DDP, replicated)`` and ``emakit EMA (DDP, shard=True)``: a DDP model, the
  average kept whole on every rank or split 1/N per rank.

Memory is the EMA's own tensors per rank. Times include the gather's communication (the
gathered model is also a per-step temporary of the full model size).

    python benchmarks/bench_distributed.py                    # 2 ranks, 16 x 1024 x 1024 (16.8M params)
    python benchmarks/bench_distributed.py --ranks 2 --layers 4 --width 256 --reps 3   # quick
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import emakit

DECAY = 0.999


def _model(layers: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def _cpu_ms(fn) -> float:
    start = time.thread_time()
    fn()
    return (time.thread_time() - start) * 1e3


def _wall_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _mib(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _worker(rank: int, world: int, args, tmp: str, queue) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rdv", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    sharded = _model(args.layers, args.width)
    for layer in sharded:
        fully_shard(layer)
    fully_shard(sharded)
    ours = emakit.EMA(sharded, decay=DECAY)

    params = list(sharded.parameters())
    replicated = [p.full_tensor().clone() for p in params]  # the peers' full EMA on every rank

    def gather_update():
        full = [p.full_tensor() for p in params]  # one all-gather per parameter, every step
        torch._foreach_lerp_(replicated, full, 1 - DECAY)

    ddp = DDP(_model(args.layers, args.width))
    ddp_rep = emakit.EMA(ddp, decay=DECAY)
    ddp_split = emakit.EMA(ddp, decay=DECAY, shard=True)

    contenders = {
        "emakit EMA (FSDP2, shard-local)": (ours.update, _mib(g.buffer for g in ours._groups)),
        "gather + replicated EMA (peers)": (gather_update, _mib(replicated)),
        "emakit EMA (DDP, replicated)": (ddp_rep.update, _mib(g.buffer for g in ddp_rep._groups)),
        "emakit EMA (DDP, shard=True)": (ddp_split.update, _mib(g.buffer for g in ddp_split._groups)),
    }
    cpu = {k: [] for k in contenders}
    wall = {k: [] for k in contenders}
    for fn, _ in contenders.values():
        fn()  # warm up
    for _ in range(args.reps):
        for name, (fn, _) in contenders.items():
            dist.barrier()
            cpu[name].append(_cpu_ms(fn))
            dist.barrier()
            wall[name].append(_wall_ms(fn))
    if rank == 0:
        rows = [(n, mib, statistics.median(cpu[n]), statistics.median(wall[n])) for n, (_, mib) in contenders.items()]
        queue.put(rows)
    del contenders, ours, ddp_rep, ddp_split, ddp  # free the DDP objects before the group goes away
    dist.barrier()
    dist.destroy_process_group()
    # The rows are sent: leave without the interpreter's teardown, where gloo's threads can still free tensors and
    # abort the process ("terminate called without an active exception": seen once in CI, on a busy machine; see
    # pytorch/pytorch#179291). An error before this point still fails the run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args(argv)
    numel = args.layers * (args.width * args.width + args.width)
    print(f"# {' '.join([os.path.basename(sys.argv[0]), *sys.argv[1:]])}")
    print(
        f"# torch {torch.__version__}, python {platform.python_version()}, {args.ranks} CPU ranks (gloo, 1 thread "
        f"each), model {numel / 1e6:.1f}M fp32 params in {2 * args.layers} tensors, {args.reps} reps, rank 0"
    )
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(args.ranks, args, tmp, queue), nprocs=args.ranks, start_method="spawn")
    rows = queue.get()
    base = rows[1][2]
    print()
    print("| contender | EMA MiB per rank | update CPU ms (median) | update wall ms (median) | CPU vs gather |")
    print("|---|---:|---:|---:|---:|")
    for name, mib, cpu_ms, wall_ms in rows:
        print(f"| {name} | {mib:.1f} | {cpu_ms:.2f} | {wall_ms:.2f} | {cpu_ms / base:.2f}x |")


if __name__ == "__main__":
    main()
