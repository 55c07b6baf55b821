"""Distributed training on 2 CPU ranks (gloo): FSDP2, DDP, DCP checkpoints, sharded snapshots.

One multi-process run holds every scenario that needs a process group (tests/dist_scenarios.py,
about 20 s); its outputs (checkpoints, snapshots) are then checked here, in a single process
without a process group, against single-process references.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import emakit
from emakit import posthoc, snapshots

sys.path.insert(0, str(Path(__file__).parent))
os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
import dist_scenarios  # noqa: E402  (the spawned ranks import it by this name)

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch was built without torch.distributed / gloo",
)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Run the 2-rank scenario once; every test below reads what it left."""
    tmp = tmp_path_factory.mktemp("dist")
    dist_scenarios.run("fsdp2_and_ddp", 2, str(tmp))
    return tmp


def test_two_rank_scenario_passes(two_ranks):
    # The scenario asserts inside the ranks (sharded == single-process EMA and PowerEMA,
    # uneven and empty shards, zero collectives per update, DDP split == replicated, swap
    # and continue training, DCP save/resume, distributed reconstruction); reaching here
    # means every rank finished without an error.
    assert (two_ranks / "ema_ckpt" / ".metadata").is_file()


def test_resume_on_another_world_size(two_ranks):
    """A checkpoint written by 2 FSDP2 ranks loads into a single-process EMA (resharded by DCP)."""
    ref = torch.load(two_ranks / "ref_ema.pt", weights_only=True)
    ema = emakit.EMA(dist_scenarios.Net(), decay=0.8)
    ema.load(two_ranks / "ema_ckpt")
    assert ema.t == ref["t"] == dist_scenarios.STEPS
    for name, value in ref["ema"]["averages"][0].items():
        assert_close(ema.state_dict()["averages"][0][name], value, msg=name)
    assert_close(ema.state_dict()["copies"]["steps"], ref["ema"]["copies"]["steps"])


def test_load_refuses_a_mismatched_checkpoint_before_changing_anything(two_ranks):
    pema = emakit.PowerEMA(dist_scenarios.Net(), sigma_rels=(0.05, 0.10))
    before = {k: v.clone() for k, v in pema.state_dict()["averages"][0].items()}
    with pytest.raises(ValueError, match="not a PowerEMA state dict"):
        pema.load(two_ranks / "ema_ckpt")  # an EMA checkpoint
    with pytest.raises(FileNotFoundError, match="no .metadata"):
        pema.load(two_ranks / "nothing-here")
    for k, v in pema.state_dict()["averages"][0].items():
        assert_close(v, before[k], rtol=0, atol=0)
    assert pema.t == 0


def test_sharded_snapshots_reconstruct_offline(two_ranks):
    """Snapshots written by 2 ranks (safetensors per rank, shards only) == snapshots of a single-process run."""
    sharded = posthoc.list_snapshots(two_ranks / "snaps")
    single = posthoc.list_snapshots(two_ranks / "ref_snaps")
    assert [s.t for s in sharded] == [s.t for s in single] == [2.0, 4.0, 6.0, 8.0]
    assert all(s.sharded and s.path.suffix == ".shards" and not s.pickled for s in sharded)
    assert not any(p.name == ".metadata" for s in sharded for p in s.path.iterdir())  # nothing pickled
    # Each rank wrote only its shards: out.weight's single row is rank 0's alone.
    index = json.loads((sharded[0].path / "emakit.json").read_text())
    assert sorted(json.loads(index["parts"])) == ["rank-00000.safetensors", "rank-00001.safetensors"]
    assert list(json.loads(index["parts"])["rank-00001.safetensors"]).count("avg.0/out.weight") == 0
    assert sharded[0].shapes == single[0].shapes and sharded[0].keys == single[0].keys
    for target in (0.05, 0.08, 0.15):
        got = posthoc.reconstruct(two_ranks / "snaps", sigma_rel=target, progress=False)
        want = posthoc.reconstruct(two_ranks / "ref_snaps", sigma_rel=target, progress=False)
        assert list(got) == list(want)
        for name in want:
            assert_close(got[name], want[name], msg=f"{target} {name}")


def test_export_to_safetensors(two_ranks, tmp_path):
    for info in posthoc.list_snapshots(two_ranks / "snaps"):
        out = snapshots.export(info.path, tmp_path)
        assert out.name == info.path.name.replace(".shards", ".safetensors")
    exported = posthoc.list_snapshots(tmp_path)
    assert not any(s.sharded for s in exported)
    got = posthoc.reconstruct(tmp_path, sigma_rel=0.08, progress=False)
    want = posthoc.reconstruct(two_ranks / "ref_snaps", sigma_rel=0.08, progress=False)
    for name in want:
        assert_close(got[name], want[name], msg=name)
    with pytest.raises(snapshots.SnapshotError, match="already a single-file snapshot"):
        snapshots.export(exported[0].path, tmp_path / "again")


def test_fsdp1_is_refused_with_a_pointer_to_fsdp2():
    from torch.distributed.fsdp import FullyShardedDataParallel

    class Fake(FullyShardedDataParallel):  # no process group needed to test the check
        def __init__(self, module):
            torch.nn.Module.__init__(self)
            self.inner = module

    with pytest.raises(TypeError, match="FSDP1.*fully_shard"):
        emakit.EMA(Fake(dist_scenarios.Net()), decay=0.9)


def test_shard_needs_a_process_group():
    with pytest.raises(RuntimeError, match="shard=True.*init_process_group"):
        emakit.EMA(dist_scenarios.Net(), decay=0.9, shard=True)
    with pytest.raises(TypeError, match="shard must be False, True or a 1-D DeviceMesh"):
        emakit.EMA(dist_scenarios.Net(), decay=0.9, shard="yes")


def test_cli_inspects_and_exports_sharded_snapshots(two_ranks, tmp_path, capsys):
    from emakit.cli import main

    assert main(["inspect", str(two_ranks / "snaps")]) == 0
    assert "4 snapshots, t = 2 … 8" in capsys.readouterr().out
    assert main(["verify", str(two_ranks / "snaps")]) == 0  # no pickle: no --trust needed
    assert main(["export", str(two_ranks / "dcp_snaps"), "--out", str(tmp_path)]) == 2  # DCP metadata is a pickle
    assert "--trust" in capsys.readouterr().err
    assert main(["export", str(two_ranks / "snaps"), "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"phema-{t:015d}.safetensors" for t in (2, 4, 6, 8)]
    assert main(["export", str(two_ranks / "dcp_snaps"), "--out", str(tmp_path), "--trust"]) == 2  # never overwrites
    assert "never replaces" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "no sharded snapshots" in capsys.readouterr().err


@pytest.mark.parametrize("engine", ["fsdp2", "ddp"])
def test_torchrun_example(engine, tmp_path):
    import subprocess

    root = Path(__file__).parents[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", str(root / "examples" / "distributed.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [*cmd, "--engine", engine, "--steps", "40", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{engine}: 2 ranks" in out.stdout and "post-hoc sigma_rel=0.08 (offline)" in out.stdout
    full = torch.load(tmp_path / "ema_full.pt", weights_only=True)
    assert full["0.weight"].shape == (64, 16) and not full["0.weight"].is_meta


def test_distributed_benchmark_runs_at_tiny_scale():
    import subprocess

    root = Path(__file__).parents[1]
    out = subprocess.run(
        [
            sys.executable,
            str(root / "benchmarks" / "bench_distributed.py"),
            "--layers",
            "2",
            "--width",
            "64",
            "--reps",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "emakit EMA (FSDP2, shard-local)" in out.stdout and "gather + replicated EMA" in out.stdout
