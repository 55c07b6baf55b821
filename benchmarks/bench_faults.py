"""Fault injection: how many injected faults emakit survives, and how many bad files it refuses cleanly.

Campaigns (each fault counted as survived when emakit behaves as docs/reliability.md promises):

1. kill -9 during snapshot writes: a child process saves snapshots in a loop and is killed
   at a random moment; survived when every listed snapshot reads and verifies, no partial
   file is listed, and the next write reclaims the dead writer's temporary file.
2. kill -9 during ``EMA.save`` (DCP): survived when the checkpoint is either absent or loads
   exactly.
3. flipped bytes in snapshot files: survived when reading raises ``SnapshotError`` naming the
   file (never a silently wrong reconstruction) or the flip hit unused padding.
4. truncated snapshot files and damaged DCP checkpoints: survived when reading raises an
   ``Exception`` naming the path and ``EMA.load`` leaves the average exactly as it was.
5. pickle payloads in DCP sharded snapshots' ``.metadata``: survived when no payload runs
   without ``trust=True``.
6. flipped bits in ``EMA.save`` checkpoints (data files and ``.metadata``) and in the parts
   of pickle-free sharded snapshots (``phema-<t>.shards``): survived when loading raises an
   ``Exception`` naming the path and leaves the average as it was (or the result is exact).

    python benchmarks/bench_faults.py            # about a minute
    python benchmarks/bench_faults.py --kills 3 --flips 20   # smoke run
"""

from __future__ import annotations

import argparse
import os
import pathlib
import pickle
import random
import signal
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

import emakit
from emakit import posthoc, snapshots

WRITER = """
import sys, torch, emakit
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
pema = emakit.PowerEMA(model)
ema = emakit.EMA(model, decay=0.9)
kind, out = sys.argv[1], sys.argv[2]
for i in range(1, 10_000):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    pema.update(); ema.update()
    if kind == "snapshot":
        pema.save_snapshot(out)
    else:
        ema.save(f"{out}/ckpt-{i:06d}")
        torch.save(ema.state_dict(), f"{out}/ref-{i:06d}.pt")
"""


def _kill_during(kind: str, directory: pathlib.Path, rng: random.Random) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, kind, str(directory)], env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    time.sleep(2.0 + rng.random() * 2.0)  # past the imports, into the writes
    child.send_signal(signal.SIGKILL)
    child.wait()


def snapshot_kills(n: int, rng: random.Random, tmp: pathlib.Path) -> tuple[int, int]:
    survived = 0
    for i in range(n):
        d = tmp / f"kill-snap-{i}"
        d.mkdir()
        _kill_during("snapshot", d, rng)
        ok = True
        try:
            for info in posthoc.list_snapshots(d) if snapshots.snapshot_paths(d) else []:
                reader = snapshots.open_tensors(info)
                for j in range(info.num_profiles):
                    for name in info.averaged:
                        reader.get(f"avg.{j}/{name}")  # verifies the checksum
                reader.close()
            leftovers = [p for p in d.iterdir() if p.name.startswith(".")]
            model = nn.Linear(2, 2)
            pema = emakit.PowerEMA(model)
            pema.update(t=10**9)  # a time no killed writer reached
            pema.save_snapshot(d)  # the next write reclaims the dead writer's temporary file
            ok = not any(p.exists() for p in leftovers)
        except Exception as e:
            print(f"  snapshot kill {i}: {type(e).__name__}: {e}")
            ok = False
        survived += ok
    return n, survived


def checkpoint_kills(n: int, rng: random.Random, tmp: pathlib.Path) -> tuple[int, int]:
    survived = 0
    for i in range(n):
        d = tmp / f"kill-ckpt-{i}"
        d.mkdir()
        _kill_during("checkpoint", d, rng)
        ok = True
        for ckpt in sorted(d.glob("ckpt-*")):
            ref = d / f"{ckpt.name.replace('ckpt-', 'ref-')}.pt"
            torch.manual_seed(0)
            model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)])
            ema = emakit.EMA(model, decay=0.9)
            try:
                ema.load(ckpt)
            except Exception as e:
                print(f"  checkpoint kill {i}: {ckpt.name} does not load: {e}")
                ok = False
                continue
            try:  # the reference is a plain torch.save, maybe cut by the kill: compare when it loads
                want = torch.load(ref, weights_only=True)
            except Exception:
                continue
            ok = ok and all(torch.equal(ema.state_dict()["averages"][0][k], v) for k, v in want["averages"][0].items())
        survived += ok
    return n, survived


def byte_flips(n: int, rng: random.Random, tmp: pathlib.Path) -> tuple[int, int]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.Linear(64, 8))
    pema = emakit.PowerEMA(model)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        pema.update()
    original = pema.save_snapshot(tmp / "flip-src").read_bytes()
    survived = 0
    for i in range(n):
        d = tmp / f"flip-{i}"
        d.mkdir()
        path = d / "phema-000000000000005.safetensors"
        raw = bytearray(original)
        pos = rng.randrange(len(raw))
        raw[pos] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(raw))
        try:
            got = posthoc.reconstruct(d, sigma_rel=0.05, progress=False)
            want = posthoc.reconstruct(tmp / "flip-src", sigma_rel=0.05, progress=False)
            ok = all(torch.equal(got[k], want[k]) for k in want)  # the flip hit padding / unused bytes
        except snapshots.SnapshotError as e:
            ok = str(path) in str(e) or str(d) in str(e)
        except Exception as e:
            print(f"  flip {i} at byte {pos}: {type(e).__name__}: {e}")
            ok = False
        survived += ok
    return n, survived


def _flip(path: pathlib.Path, rng: random.Random) -> None:
    raw = bytearray(path.read_bytes())
    raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(raw))


def checkpoint_flips(n: int, rng: random.Random, tmp: pathlib.Path) -> tuple[int, int]:
    """Flip one bit of an ``EMA.save`` directory (mostly its data, sometimes its metadata) and load it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.Linear(64, 8))
    source = emakit.EMA(model, decay=0.9)
    source.update()
    source.save(tmp / "ckflip-src")
    want = {k: v.clone() for k, v in source.state_dict()["averages"][0].items()}
    survived = 0
    for i in range(n):
        d = tmp / f"ckflip-{i}"
        subprocess.run(["cp", "-r", str(tmp / "ckflip-src"), str(d)], check=True)
        _flip(d / ".metadata" if i % 10 == 0 else next(d.glob("*.distcp")), rng)
        fresh = emakit.EMA(model, decay=0.9)
        before = {k: v.clone() for k, v in fresh.state_dict()["averages"][0].items()}
        try:
            fresh.load(d)
            ok = all(torch.equal(fresh.state_dict()["averages"][0][k], v) for k, v in want.items())
        except Exception as e:
            ok = str(d) in str(e) and all(
                torch.equal(fresh.state_dict()["averages"][0][k], v) for k, v in before.items()
            )
            if not ok:
                print(f"  checkpoint flip {i}: {type(e).__name__}: {str(e)[:200]}")
        survived += ok
    return n, survived


def shard_flips(n: int, rng: random.Random, tmp: pathlib.Path) -> tuple[int, int]:
    """Flip one bit in a part file of a ``.shards`` snapshot (written in one process) and reconstruct."""
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    fields = dict(
        t=1.0, num_updates=1, sigma_rels=[0.1], gammas=[emakit.schedules.sigma_rel_to_gamma(0.1)],
        averages=[{"w": w}], copies={}, static={}, model_shapes={"w": (64, 64)},
        model_dtypes={"w": torch.float32}, dtype=torch.float32, keys=["w"], aliases={},
    )  # fmt: skip
    src = snapshots.write_sharded_snapshot(tmp / "shflip-src", **fields)
    survived = 0
    for i in range(n):
        d = tmp / f"shflip-{i}"
        subprocess.run(["cp", "-r", str(tmp / "shflip-src"), str(d)], check=True)
        _flip(d / src.name / "rank-00000.safetensors", rng)
        try:
            got = posthoc.reconstruct(d, sigma_rel=0.1, progress=False)
            ok = torch.equal(got["w"], w)
        except snapshots.SnapshotError as e:
            ok = str(d) in str(e)
        except Exception as e:
            print(f"  shard flip {i}: {type(e).__name__}: {e}")
            ok = False
        survived += ok
    return n, survived


def truncations_and_dcp(rng: random.Random, tmp: pathlib.Path) -> tuple[int, int]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.Linear(32, 4))
    pema = emakit.PowerEMA(model)
    ema = emakit.EMA(model, decay=0.9)
    pema.update()
    ema.update()
    snap = pema.save_snapshot(tmp / "trunc-src")
    ema.save(tmp / "trunc-ckpt")
    tried = survived = 0
    for frac in (0.0, 0.1, 0.5, 0.9, 0.99):
        tried += 1
        d = tmp / f"trunc-{frac}"
        d.mkdir()
        (d / snap.name).write_bytes(snap.read_bytes()[: int(snap.stat().st_size * frac)])
        try:
            posthoc.reconstruct(d, sigma_rel=0.05, progress=False)
        except snapshots.SnapshotError as e:
            survived += str(d) in str(e)
        except Exception as e:
            print(f"  truncated snapshot {frac}: {type(e).__name__}: {e}")
    for frac in (0.1, 0.5, 0.9):
        for target in ("data", "metadata"):
            tried += 1
            d = tmp / f"dcp-{target}-{frac}"
            subprocess.run(["cp", "-r", str(tmp / "trunc-ckpt"), str(d)], check=True)
            f = d / ".metadata" if target == "metadata" else next(d.glob("*.distcp"))
            f.write_bytes(f.read_bytes()[: int(f.stat().st_size * frac)])
            fresh = emakit.EMA(model, decay=0.9)
            before = {k: v.clone() for k, v in fresh.state_dict()["averages"][0].items()}
            try:
                fresh.load(d)
                print(f"  damaged checkpoint {target} {frac} loaded")
            except Exception as e:
                same = all(torch.equal(fresh.state_dict()["averages"][0][k], v) for k, v in before.items())
                survived += same and str(d) in str(e)
    return tried, survived


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def pickles(tmp: pathlib.Path) -> tuple[int, int]:
    path = snapshots.write_sharded_snapshot(
        tmp / "pickle", container="dcp", t=1.0, num_updates=1, sigma_rels=[0.1], gammas=[emakit.schedules.sigma_rel_to_gamma(0.1)],
        averages=[{"w": torch.ones(2)}], copies={}, static={}, model_shapes={"w": (2,)},
        model_dtypes={"w": torch.float32}, dtype=torch.float32, keys=["w"], aliases={},
    )  # fmt: skip
    marker = tmp / "payload-ran"
    (path / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    calls = [
        lambda: posthoc.list_snapshots(tmp / "pickle"),
        lambda: posthoc.reconstruct(tmp / "pickle", sigma_rel=0.1, progress=False),
        lambda: snapshots.export(path, tmp / "exported"),
        lambda: snapshots.open_tensors(snapshots.read_info(path), ["avg.0/w"]),
    ]
    survived = 0
    for call in calls:
        try:
            call()
        except snapshots.SnapshotError:
            pass
        survived += not marker.exists()
    return len(calls), survived


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--flips", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        rows = [
            ("kill -9 during snapshot writes", snapshot_kills(args.kills, rng, tmp)),
            ("kill -9 during EMA.save (DCP)", checkpoint_kills(args.kills, rng, tmp)),
            ("flipped bit in a snapshot file", byte_flips(args.flips, rng, tmp)),
            ("truncated snapshot / damaged DCP checkpoint", truncations_and_dcp(rng, tmp)),
            ("pickle payload in a DCP sharded snapshot", pickles(tmp)),
            ("flipped bit in an EMA.save checkpoint", checkpoint_flips(args.flips // 2, rng, tmp)),
            ("flipped bit in a sharded snapshot part", shard_flips(args.flips // 2, rng, tmp)),
        ]
    print(f"command: python benchmarks/{' '.join(['bench_faults.py', *sys.argv[1:]])}")
    print(f"versions: torch {torch.__version__}, emakit {emakit.__version__}\n")
    print("| fault | injected | survived |")
    print("|---|---:|---:|")
    for name, (tried, ok) in rows:
        print(f"| {name} | {tried} | {ok} |")


if __name__ == "__main__":
    main()
