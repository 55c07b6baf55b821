"""Multi-process scenarios run by tests/test_distributed.py (imported by the worker processes).

Every scenario compares the distributed run against a single-process reference computed
in the same process on the same global batch, so each rank can check its own shards.
"""

from __future__ import annotations

import copy
import datetime
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.testing import assert_close

import emakit
from emakit import posthoc

STEPS = 8
SNAPSHOT_EVERY = 2
BATCH = 8  # global batch; each of the ranks takes an equal slice


class Net(nn.Module):
    """Uneven shapes on purpose: over 2 ranks ``out.weight`` (1, 3) leaves rank 1 an empty shard."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 3)
        self.out = nn.Linear(3, 1)
        self.register_buffer("scale", torch.ones(3))  # a float buffer, updated the same way on every rank
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # copied, not averaged

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.scale.mul_(0.9).add_(0.1)
                self.steps.add_(1)
        return self.out(torch.tanh(self.inp(x)) * self.scale)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 5, generator=g), torch.randn(BATCH, 1, generator=g)


def local(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = t.shape[0] // world
    return t[rank * n : (rank + 1) * n]


def train_step(model, opt, x, y) -> None:
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- running ranks


def run(scenario: str, world: int, tmp: str, timeout: float = 150.0) -> None:
    """Run ``scenario`` on ``world`` CPU ranks (gloo, file:// rendezvous); raise what a rank raised."""
    ctx = mp.start_processes(_entry, args=(scenario, world, tmp), nprocs=world, join=False, start_method="spawn")
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    while not ctx.join(timeout=1.0):
        if datetime.datetime.now() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"distributed scenario {scenario!r} did not finish within {timeout} s")


def _entry(rank: int, scenario: str, world: int, tmp: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/rendezvous",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        globals()[scenario](rank, world, Path(tmp))
        _quiesce()
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def _quiesce() -> None:
    """Free the scenario's models and wait for every rank before tearing the process group down.

    Without this, a rank that exits while the other still holds DDP/FSDP objects bound to the
    group occasionally aborted in teardown ("terminate called without an active exception").
    """
    import gc

    gc.collect()
    dist.barrier()


class _CountCollectives:
    """Counts process-group collectives issued inside the block (c10d and DTensor's functional ones)."""

    NAMES = (
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "reduce_scatter_tensor",
        "broadcast",
        "barrier",
        "all_to_all_single",
        "send",
        "recv",
        "gather",
        "scatter",
    )

    def __enter__(self):
        from torch.distributed.tensor.debug import CommDebugMode

        self.calls = 0
        self._saved = {n: getattr(dist, n) for n in self.NAMES}
        for n, fn in self._saved.items():
            setattr(dist, n, self._counting(fn))
        self._mode = CommDebugMode()
        self._mode.__enter__()
        return self

    def _counting(self, fn):
        def wrapper(*args, **kwargs):
            self.calls += 1
            return fn(*args, **kwargs)

        return wrapper

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for n, fn in self._saved.items():
            setattr(dist, n, fn)
        self.calls += self._mode.get_total_counts()
        return False


# --------------------------------------------------------------------------- scenarios


def _rewrite_as_dcp(info, directory: Path, like: dict) -> None:
    """Write a snapshot again as a DCP one (collective), its averages laid out like ``like``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from emakit import snapshots

    def laid_out(name, value):
        target = like.get(name)
        if isinstance(target, DTensor):
            return distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
        return value

    reader = snapshots.open_tensors(info)
    averages = [{n: laid_out(n, reader.get(f"avg.{j}/{n}")) for n in info.averaged} for j in range(info.num_profiles)]
    copies = {n: reader.get(f"copy/{n}") for n in info.copied}
    reader.close()
    snapshots.write_sharded_snapshot(
        directory, averages=averages, copies=copies, static={}, model_shapes=dict(info.shapes), container="dcp",
        t=info.t, num_updates=info.num_updates, sigma_rels=list(info.sigma_rels), gammas=list(info.gammas),
        model_dtypes=dict(info.model_dtypes), dtype=info.dtype, keys=list(info.keys), aliases=dict(info.aliases),
    )  # fmt: skip


def fsdp2_and_ddp(rank: int, world: int, tmp: Path) -> None:
    """FSDP2 EMA/PowerEMA == single-process; DDP split == replicated; swap; DCP; snapshots."""
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    ref = Net()
    init = copy.deepcopy(ref.state_dict())
    model = Net()
    model.load_state_dict(init)
    fully_shard(model.out)
    fully_shard(model)  # the root keeps ``inp``: it stays unsharded after a no_grad forward
    ddp_module = Net()
    ddp_module.load_state_dict(init)
    ddp = DDP(ddp_module)

    ema, ref_ema = emakit.EMA(model, decay=0.8), emakit.EMA(ref, decay=0.8)
    pema, ref_pema = (emakit.PowerEMA(m, sigma_rels=(0.05, 0.10)) for m in (model, ref))
    split, replicated = emakit.EMA(ddp, decay=0.8, shard=True), emakit.EMA(ddp, decay=0.8)
    opts = [torch.optim.SGD(m.parameters(), lr=0.2) for m in (model, ref, ddp)]
    snaps, ref_snaps = tmp / "snaps", tmp / "ref_snaps"

    # Each rank stores only its shard: l.weight (3, 5) -> 2 + 1 rows, out.weight (1, 3) -> 1 + 0 rows.
    avg = ema.state_dict()["averages"][0]
    assert isinstance(avg["inp.weight"], DTensor) and avg["inp.weight"].placements == (Shard(0),)
    assert avg["inp.weight"].shape == (3, 5) and avg["inp.weight"].stride() == (5, 1)
    assert avg["inp.weight"].to_local().shape == ((2, 5) if rank == 0 else (1, 5))
    assert avg["out.weight"].to_local().shape == ((1, 3) if rank == 0 else (0, 3))
    assert not isinstance(avg["scale"], DTensor)  # FSDP2 keeps buffers replicated
    assert sum(g.numel for g in split._groups) < 0.75 * sum(g.numel for g in replicated._groups)
    assert ema.is_sharded and pema.is_sharded and split.is_sharded
    assert not replicated.is_sharded and not ref_ema.is_sharded

    for step in range(1, STEPS + 1):
        x, y = batch(step)
        train_step(model, opts[0], local(x, rank, world), local(y, rank, world))
        train_step(ref, opts[1], x, y)
        train_step(ddp, opts[2], local(x, rank, world), local(y, rank, world))
        with _CountCollectives() as counter:
            ema.update()
            pema.update()
            split.update()
            replicated.update()
        assert counter.calls == 0, f"{counter.calls} collectives during the updates"
        ref_ema.update()
        ref_pema.update()
        if step % SNAPSHOT_EVERY == 0:
            pema.save_snapshot(snaps)  # collective: each rank writes its shards
            if rank == 0:
                ref_pema.save_snapshot(ref_snaps)

    # Sharded EMA == single-process EMA: each rank's shards, and the gathered full state dict.
    expected = ref_ema.averaged_state_dict()
    for name, value in ema.averaged_state_dict().items():
        if isinstance(value, DTensor):
            layout = emakit.distributed.Layout(value.device_mesh, tuple(value.placements), value.shape, (), value.shape)
            assert_close(value.to_local(), layout.local_of(expected[name]), msg=name)
        else:
            assert_close(value, expected[name], msg=name)
    full = ema.averaged_state_dict(full=True)
    if rank == 0:
        assert list(full) == list(expected)
        for name in expected:
            assert full[name].device.type == "cpu" and not isinstance(full[name], DTensor)
            assert_close(full[name], expected[name], msg=name)
    else:
        assert full == {}
    full_p = pema.averaged_state_dict(sigma_rel=0.10, full=True)
    if rank == 0:
        for name, value in ref_pema.averaged_state_dict(sigma_rel=0.10).items():
            assert_close(full_p[name], value, msg=name)

    # DDP split == replicated, exactly (same arithmetic on the same rows).
    full_split = split.averaged_state_dict(full=True)
    if rank == 0:
        for name, value in replicated.averaged_state_dict().items():
            assert_close(full_split[name], value, rtol=0, atol=0, msg=name)
    with split.swapped():  # gathers the full average into every replica
        for name, value in replicated.averaged_state_dict().items():
            assert_close(ddp.module.state_dict()[name], value, rtol=0, atol=0, msg=name)

    # Save/resume with DCP, as the object's own save and as a Stateful in the user's dict.
    ema.save(tmp / "ema_ckpt")
    dcp_save({"ema": pema, "model": model.state_dict()}, checkpoint_id=str(tmp / "user_ckpt"))
    resumed = emakit.EMA(model, decay=0.8)
    resumed.load(tmp / "ema_ckpt")
    resumed_p = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10))
    dcp_load({"ema": resumed_p}, checkpoint_id=str(tmp / "user_ckpt"))
    assert resumed.t == ema.t and resumed.num_updates == ema.num_updates and resumed_p.t == pema.t
    if rank == 0:
        torch.save({"ema": ref_ema.state_dict(), "t": ref_ema.t}, tmp / "ref_ema.pt")

    # Evaluate with the averages, then keep training: the FSDP2 root must not keep stale weights.
    x, y = batch(STEPS + 1)
    with ema.swapped(), torch.no_grad():
        out = model(local(x, rank, world))
    with ref_ema.swapped(), torch.no_grad():
        ref_out = ref(local(x, rank, world))
    assert_close(out, ref_out)
    train_step(model, opts[0], local(x, rank, world), local(y, rank, world))
    train_step(ref, opts[1], x, y)
    for name, value in model.state_dict().items():
        value = value.full_tensor() if isinstance(value, DTensor) else value
        assert_close(value, ref.state_dict()[name], msg=name)
    # A resumed average continues exactly like the one that never stopped.
    for avg_ in (ema, resumed, ref_ema, pema, resumed_p):
        avg_.update()
    for a, b in ((ema, resumed), (pema, resumed_p)):
        for pa, pb in zip(a.state_dict()["averages"], b.state_dict()["averages"]):
            for name in pa:
                assert_close(
                    pa[name].to_local() if isinstance(pa[name], DTensor) else pa[name],
                    pb[name].to_local() if isinstance(pb[name], DTensor) else pb[name],
                    rtol=0,
                    atol=0,
                )

    # Distributed post-hoc reconstruction: each rank reads its own shards.
    dist.barrier()  # rank 0's reference snapshots are complete
    rebuilt = posthoc.reconstruct(snaps, sigma_rel=0.08, like=model.state_dict(), progress=False)
    reference = posthoc.reconstruct(ref_snaps, sigma_rel=0.08, progress=False)
    assert list(rebuilt) == list(reference)
    for name, value in rebuilt.items():
        value = value.full_tensor() if isinstance(value, DTensor) else value
        assert_close(value, reference[name], msg=name)
    # The earlier DCP form of the same snapshots (collective reads, trust=True) gives the same.
    for info in posthoc.list_snapshots(snaps):
        _rewrite_as_dcp(info, tmp / "dcp_snaps", model.state_dict())
    legacy = posthoc.reconstruct(tmp / "dcp_snaps", sigma_rel=0.08, like=model.state_dict(), progress=False, trust=True)
    for name, value in legacy.items():
        value = value.full_tensor() if isinstance(value, DTensor) else value
        assert_close(value, reference[name], msg=name)

    # A NaN in one rank's shard: every rank refuses the collective save (none waits in the write).
    if rank == 0:
        with torch.no_grad():
            resumed._storage.groups[0].buffer.view(-1)[0] = float("nan")
    try:
        resumed.save(tmp / "nan_ckpt")
        raise AssertionError("a NaN average was saved")
    except emakit.NonFiniteError as e:
        assert ("another rank" in str(e)) == (rank == 1), str(e)
    dist.barrier()
    assert not (tmp / "nan_ckpt").exists()

    hsdp_and_tensor_parallel(rank, world, tmp)


def deepspeed_zero3(rank: int, world: int, tmp: Path) -> None:
    """DeepSpeed ZeRO-3: each rank averages its partition, == an EMA of the gathered weights; swap; snapshots."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # what a launcher sets
    deepspeed.init_distributed(dist_backend="gloo")  # reuses the process group set up above
    torch.manual_seed(0)
    net = Net()
    mirror = copy.deepcopy(net)  # the full weights, gathered after every step: the peers' way, our reference
    config = {
        "train_batch_size": BATCH,
        "train_micro_batch_size_per_gpu": BATCH // world,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(
        model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.2), config=config
    )
    params = list(engine.module.parameters())
    ema, ref_ema = emakit.EMA(engine, decay=0.8), emakit.EMA(mirror, decay=0.8)
    pema, ref_pema = emakit.PowerEMA(engine, sigma_rels=(0.05, 0.10)), emakit.PowerEMA(mirror, sigma_rels=(0.05, 0.10))
    # inp.weight: 15 elements, partitions of 8 and 7 (DeepSpeed pads rank 1's to 8).
    assert ema.state_dict()["averages"][0]["inp.weight"].to_local().numel() == (8 if rank == 0 else 7)

    def gathered() -> dict[str, torch.Tensor]:
        with GatheredParameters(params):
            return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}

    for step in range(1, STEPS + 1):
        x, y = batch(step)
        engine.backward(nn.functional.mse_loss(engine(local(x, rank, world)), local(y, rank, world)))
        engine.step()
        with _CountCollectives() as counter:
            ema.update()
            pema.update()
        assert counter.calls == 0, f"{counter.calls} collectives during the updates"
        mirror.load_state_dict(gathered())
        ref_ema.update()
        ref_pema.update()
        if step % SNAPSHOT_EVERY == 0:
            pema.save_snapshot(tmp / "ds_snaps")
            if rank == 0:
                ref_pema.save_snapshot(tmp / "ds_ref_snaps")

    full = ema.averaged_state_dict(full=True)
    if rank == 0:
        for name, value in ref_ema.averaged_state_dict().items():
            assert_close(full[name], value, msg=name)

    # Evaluate with the averages (DeepSpeed keeps small parameters gathered between steps).
    x, _ = batch(STEPS + 1)
    before = gathered()
    engine.eval()
    mirror.eval()
    with torch.no_grad():
        out_before = engine(local(x, rank, world))
    with ema.swapped(), torch.no_grad():
        out = engine(local(x, rank, world))
    with ref_ema.swapped(), torch.no_grad():
        ref_out = mirror(local(x, rank, world))
    assert_close(out, ref_out)
    with torch.no_grad():
        assert_close(engine(local(x, rank, world)), out_before)  # restored, gathered copies included
    for name, value in gathered().items():
        assert_close(value, before[name], rtol=0, atol=0, msg=name)

    # ZeRO-2 keeps full parameters on every rank: replicated, or split with shard=True (== exactly).
    net2 = Net()
    engine2, _, _, _ = deepspeed.initialize(
        model=net2,
        optimizer=torch.optim.SGD(net2.parameters(), lr=0.2),
        config={**config, "zero_optimization": {"stage": 2}},
    )
    replicated, split = emakit.EMA(engine2, decay=0.8), emakit.EMA(engine2, decay=0.8, shard=True)
    for step in range(1, 4):
        x, y = batch(step)
        engine2.backward(nn.functional.mse_loss(engine2(local(x, rank, world)), local(y, rank, world)))
        engine2.step()
        replicated.update()
        split.update()
    full = split.averaged_state_dict(full=True)
    if rank == 0:
        for name, value in replicated.averaged_state_dict().items():
            assert_close(full[name], value, rtol=0, atol=0, msg=name)
    dist.barrier()


def hsdp_and_tensor_parallel(rank: int, world: int, tmp: Path) -> None:
    """HSDP with bf16 mixed precision, and tensor parallelism: == an EMA of the gathered weights."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    hsdp_mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    tp_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    hsdp = Net()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fully_shard(hsdp.out, mesh=hsdp_mesh, mp_policy=policy)  # casts its (fp32-scaled) input to bf16
    fully_shard(hsdp, mesh=hsdp_mesh, reshard_after_forward=False, mp_policy=policy)

    def tp_net():
        return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1))  # (torch's TP needs even shards)

    tp = parallelize_module(tp_net(), tp_mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})

    def gathered(model):
        return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}

    for model in (hsdp, tp):
        mirror = Net() if model is hsdp else tp_net()  # the full weights after every step: the reference
        mirror.load_state_dict(gathered(model))
        ema, ref_ema = emakit.EMA(model, decay=0.8), emakit.EMA(mirror, decay=0.8)
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        avg = ema.state_dict()["averages"][0]
        w = avg["inp.weight" if model is hsdp else "0.weight"]
        assert isinstance(w, DTensor) and w.shape == ((3, 5) if model is hsdp else (4, 5)) and w.dtype == torch.float32
        if model is hsdp:
            assert w.placements == (Replicate(), Shard(0)) and w.to_local().shape == (3, 5)
        else:
            assert w.placements == (Shard(0),) and w.to_local().shape == (2, 5)
            assert avg["2.weight"].placements == (Shard(1),)
        for step in range(1, 5):
            x, y = batch(step)
            xs, ys = (local(x, rank, world), local(y, rank, world)) if model is hsdp else (x, y)
            train_step(model, opt, xs, ys)
            with _CountCollectives() as counter:
                ema.update()
            assert counter.calls == 0
            mirror.load_state_dict(gathered(model))
            ref_ema.update()
        got = ema.averaged_state_dict(full=True)
        if rank == 0:
            for name, value in ref_ema.averaged_state_dict().items():
                assert_close(got[name], value, msg=name)
