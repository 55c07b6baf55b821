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
import json
import math
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
from emakit import planning, posthoc, snapshots

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


# ---- hostile and unusual files (issue 21) ----------------------------------------------------------

DEEP = 100_000  # nesting levels of the deep-JSON cases (Python's parser gives up near 1000)
SPARSE = 8 << 30  # bytes of the sparse-file cases (no disk used)


def _base_run(directory: pathlib.Path, encoding: str = "fp32") -> pathlib.Path:
    """Six small snapshots of a Linear(8, 8) (a fresh directory)."""
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    pema = emakit.PowerEMA(model)
    for step in range(1, 61):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight) * 0.01)
        pema.update()
        if step % 10 == 0:
            pema.save_snapshot(directory, encoding=encoding)
    return directory


def _sharded(tmp: pathlib.Path, name: str) -> tuple[pathlib.Path, pathlib.Path]:
    """A directory holding the base run's snapshots as ``.shards`` folders, and its last snapshot."""
    d = tmp / name
    for info in posthoc.list_snapshots(tmp / "base"):
        reader = snapshots.open_tensors(info)
        fields = dict(
            t=info.t, num_updates=info.num_updates, sigma_rels=list(info.sigma_rels), gammas=list(info.gammas),
            averages=[{n: reader.get(f"avg.{j}/{n}") for n in info.averaged} for j in range(info.num_profiles)],
            copies={}, static={}, model_shapes=dict(info.shapes), model_dtypes=dict(info.model_dtypes),
            dtype=info.dtype, keys=list(info.keys), aliases=dict(info.aliases),
        )  # fmt: skip
        reader.close()
        last = snapshots.write_sharded_snapshot(d, **fields)
    return d, last


def _copy_base(tmp: pathlib.Path, name: str, base: str = "base") -> pathlib.Path:
    subprocess.run(["cp", "-r", str(tmp / base), str(tmp / name)], check=True)
    return tmp / name


def _rewrite_metadata(path: pathlib.Path, **fields: str) -> None:
    """Rewrite a single-file snapshot with some metadata fields replaced (tensors as they are)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    path.unlink()
    save_file(tensors, str(path), metadata={**meta, **fields})


def _nested(depth: int = DEEP) -> str:
    return "[" * depth + "]" * depth


def _index_case(tmp: pathlib.Path, name: str, damage) -> pathlib.Path:
    d, last = _sharded(tmp, name)
    index = last / snapshots._DCP_INFO
    damage(index)
    return d


def _replace_with_fifo(path: pathlib.Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _replace_with_dev_zero(path: pathlib.Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/zero")


def _replace_with_sparse(path: pathlib.Path) -> None:
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(SPARSE)


def _deepen_index(field: str | None):
    def damage(index: pathlib.Path) -> None:
        record = json.loads(index.read_text())
        if field is None:
            index.write_text(_nested())
        else:
            record[field] = _nested()
            index.write_text(json.dumps(record))

    return damage


def _huge_index_shape(index: pathlib.Path) -> None:
    """The last snapshot's index claims a 16 TiB ``weight`` (``[2**21, 2**21]`` fp32) in one part."""
    record = json.loads(index.read_text())
    tensors, parts = json.loads(record["tensors"]), json.loads(record["parts"])
    huge = [2**21, 2**21]
    for key in tensors:
        if key.endswith("/weight"):
            tensors[key] = [tensors[key][0], huge, huge]
            for table in parts.values():
                if key in table:
                    table[key] = [[0, 0], huge, table[key][2]]
    record["tensors"], record["parts"] = json.dumps(tensors), json.dumps(parts)
    index.write_text(json.dumps(record))


def _journal_case(tmp: pathlib.Path, name: str, damage) -> pathlib.Path:
    d = _copy_base(tmp, name)
    damage(d / planning.JOURNAL)
    return d


def _write_deep_journal(path: pathlib.Path) -> None:
    path.write_text(_nested())


def _metadata_case(tmp: pathlib.Path, name: str, base: str = "base", **fields: str) -> pathlib.Path:
    d = _copy_base(tmp, name, base)
    _rewrite_metadata(snapshots.snapshot_paths(d)[-1], **fields)
    return d


def _huge_compact(tmp: pathlib.Path) -> pathlib.Path:
    """A compact snapshot whose header says its ``weight`` averages are ``[2**31, 2**31]`` (16 EiB)."""
    d = _copy_base(tmp, "compact-huge", "base-compact")
    path = snapshots.snapshot_paths(d)[-1]
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        shapes = json.loads(f.metadata()["shapes"])
    _rewrite_metadata(path, shapes=json.dumps({k: [2**31, 2**31] if "weight" in k else v for k, v in shapes.items()}))
    return d


def _compact_bomb(tmp: pathlib.Path) -> pathlib.Path:
    """A compact snapshot whose ``weight`` payload inflates to 4 GiB of zeros (zlib, ~4 MiB), checksums redone."""
    import zlib

    from safetensors import safe_open
    from safetensors.torch import save_file

    from emakit._files import checksums

    d = _copy_base(tmp, "compact-bomb", "bomb-base")
    path = snapshots.snapshot_paths(d)[-1]
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    squash, zeros = zlib.compressobj(9), bytes(64 << 20)
    bomb = b"".join(squash.compress(zeros) for _ in range(64)) + squash.flush()
    tensors["avg.0/weight"] = torch.frombuffer(bytearray(bomb), dtype=torch.uint8)
    algorithm = meta.get("checksum_algorithm", "crc32")
    meta["checksums"] = json.dumps({k: checksums.hex_digest(v, algorithm) for k, v in tensors.items()})
    path.unlink()
    save_file(tensors, str(path), metadata=meta)
    return d


def _special_snapshot(tmp: pathlib.Path, name: str, damage) -> pathlib.Path:
    """A file named like a snapshot that is a FIFO, ``/dev/zero`` or a sparse 8 GiB file: given to each command."""
    d = tmp / name
    d.mkdir()
    damage(d / "phema-000000000000070.safetensors")
    return d / "phema-000000000000070.safetensors"


HOSTILE_NAMES = (
    "index is a FIFO", "index is /dev/zero", "index is an 8 GiB sparse file", "index nested 100000 deep",
    "index parts nested 100000 deep", "index claims a 16 TiB tensor", "metadata nested 100000 deep",
    "compact header claims [2**31, 2**31]", "prune journal is a FIFO", "prune journal is an 8 GiB sparse file",
    "prune journal nested 100000 deep", "snapshot file is a FIFO", "snapshot file is /dev/zero",
    "snapshot file is an 8 GiB sparse file",
)  # fmt: skip


def hostile_cases(tmp: pathlib.Path) -> dict[str, pathlib.Path]:
    """Each hostile case: a snapshot directory (or, for special files, the file) to hand every command."""
    _base_run(tmp / "base")
    _base_run(tmp / "base-compact", encoding="compact")
    cases = {
        "index is a FIFO": _index_case(tmp, "index-fifo", _replace_with_fifo),
        "index is /dev/zero": _index_case(tmp, "index-zero", _replace_with_dev_zero),
        "index is an 8 GiB sparse file": _index_case(tmp, "index-sparse", _replace_with_sparse),
        "index nested 100000 deep": _index_case(tmp, "index-deep", _deepen_index(None)),
        "index parts nested 100000 deep": _index_case(tmp, "parts-deep", _deepen_index("parts")),
        "index claims a 16 TiB tensor": _index_case(tmp, "index-huge", _huge_index_shape),
        "metadata nested 100000 deep": _metadata_case(tmp, "meta-deep", keys=_nested()),
        "compact header claims [2**31, 2**31]": _huge_compact(tmp),
        "prune journal is a FIFO": _journal_case(tmp, "journal-fifo", _replace_with_fifo),
        "prune journal is an 8 GiB sparse file": _journal_case(tmp, "journal-sparse", _replace_with_sparse),
        "prune journal nested 100000 deep": _journal_case(tmp, "journal-deep", _write_deep_journal),
        "snapshot file is a FIFO": _special_snapshot(tmp, "snap-fifo", _replace_with_fifo),
        "snapshot file is /dev/zero": _special_snapshot(tmp, "snap-zero", _replace_with_dev_zero),
        "snapshot file is an 8 GiB sparse file": _special_snapshot(tmp, "snap-sparse", _replace_with_sparse),
    }
    assert tuple(cases) == HOSTILE_NAMES
    return cases


COMMANDS = {
    "inspect": lambda p, o: ["inspect", p],
    "verify": lambda p, o: ["verify", p],
    "reconstruct": lambda p, o: ["reconstruct", p, "--sigma-rel", "0.1", "--out", o, "-q"],
    "prune": lambda p, o: ["prune", p, "--sigma-rel", "0.05:0.1", "--dry-run"],
    "export": lambda p, o: ["export", p, "--out", o, "-q"],
}
_RUN_CLI = (
    "import resource, sys\nfrom emakit import cli\nrc = cli.main(sys.argv[1:])\n"
    "print('@@rss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\nsys.exit(rc)\n"
)


def run_cli(argv: list[str], timeout: float = 30.0) -> tuple[int | None, list[str], float, float]:
    """``(exit status or None on timeout, stderr lines, seconds, peak RSS in MiB)`` of one ``emakit`` call."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-c", _RUN_CLI, *argv], capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return None, ["timed out"], time.perf_counter() - start, math.nan
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    rss = [float(line.split()[1]) / 1024 for line in lines if line.startswith("@@rss")]
    lines = [line for line in lines if not line.startswith("@@rss")]
    return done.returncode, lines, time.perf_counter() - start, rss[0] if rss else math.nan


def compact_bombs(tmp: pathlib.Path) -> tuple[int, int]:
    """The commands that decode compact payloads on one whose payload inflates to 4 GiB: survived when each
    ends within 30 s with one error line (verify: its problem line, status 1) in at most 2 GiB."""
    _base_run(tmp / "bomb-base", encoding="compact")
    path = _compact_bomb(tmp)
    tried = survived = 0
    for command in ("verify", "reconstruct"):  # the commands that decode a single-file snapshot
        tried += 1
        rc, lines, seconds, rss = run_cli([str(a) for a in COMMANDS[command](path, tmp / f"bomb-{command}")])
        ok = rc == (1 if command == "verify" else 2) and len(lines) == (command != "verify") and seconds < 30
        survived += ok and rss < 2048 and not any("Traceback" in x for x in lines)
        print(f"  compact bomb / {command}: rc {rc}, {seconds:.1f} s, peak RSS {rss:.0f} MiB: {lines[-1:]}")
    return tried, survived


def _expected(case: str, command: str) -> int:
    """The exit status a command owes a case: 2 (a bad input), but ``verify`` 1 where it checked a regular file
    or directory and reports the problem (its contract: problems found are status 1, one line each on stdout)."""
    if command == "verify" and not (case.startswith("snapshot") and case.endswith(("FIFO", "/dev/zero"))):
        return 1
    return 2


def hostile_files(tmp: pathlib.Path, verbose: bool = False) -> tuple[int, int]:
    """Every command on every hostile case: survived when it ends within 30 s with the expected status, one
    error line and no traceback, in at most 2 GiB (a small model: the largest legitimate tensor is tiny)."""
    tried = survived = 0
    slowest = largest = 0.0
    for case, path in hostile_cases(tmp).items():
        for command, argv in COMMANDS.items():
            if "journal" in case and command != "prune":
                continue  # only prune reads its journal
            tried += 1
            want = _expected(case, command)
            rc, lines, seconds, rss = run_cli([str(a) for a in argv(path, tmp / f"out-{tried}")])
            ok = rc == want and seconds < 30 and rss < 2048 and not any("Traceback" in x for x in lines)
            ok = ok and (len(lines) == 1 if want == 2 else not lines)
            survived += ok
            slowest, largest = max(slowest, seconds), max(largest, rss)
            if verbose or not ok:
                print(f"  {case} / {command}: rc {rc} (want {want}), {seconds:.1f} s, {rss:.0f} MiB: {lines[-1:]}")
    print(f"  hostile files: slowest call {slowest:.1f} s, largest peak RSS {largest:.0f} MiB (a process with torch)")
    return tried, survived


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--flips", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["hostile", "bombs"], default=None, help="run one campaign only")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every hostile-file call")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        if args.only == "hostile":
            rows = [("hostile or special file x command (5 commands)", hostile_files(tmp, args.verbose))]
        elif args.only == "bombs":
            rows = [("compact payload inflating to 4 GiB x decoding command", compact_bombs(tmp))]
        else:
            rows = _all_campaigns(args, rng, tmp)
    _report(rows)


def _all_campaigns(args, rng: random.Random, tmp: pathlib.Path) -> list:
    return [
        ("kill -9 during snapshot writes", snapshot_kills(args.kills, rng, tmp)),
        ("kill -9 during EMA.save (DCP)", checkpoint_kills(args.kills, rng, tmp)),
        ("flipped bit in a snapshot file", byte_flips(args.flips, rng, tmp)),
        ("truncated snapshot / damaged DCP checkpoint", truncations_and_dcp(rng, tmp)),
        ("pickle payload in a DCP sharded snapshot", pickles(tmp)),
        ("flipped bit in an EMA.save checkpoint", checkpoint_flips(args.flips // 2, rng, tmp)),
        ("flipped bit in a sharded snapshot part", shard_flips(args.flips // 2, rng, tmp)),
        ("hostile or special file x command (5 commands)", hostile_files(tmp, args.verbose)),
        ("compact payload inflating to 4 GiB x decoding command", compact_bombs(tmp)),
    ]


def _report(rows: list) -> None:
    print(f"command: python benchmarks/{' '.join(['bench_faults.py', *sys.argv[1:]])}")
    print(f"versions: torch {torch.__version__}, emakit {emakit.__version__}\n")
    print("| fault | injected | survived |")
    print("|---|---:|---:|")
    for name, (tried, ok) in rows:
        print(f"| {name} | {tried} | {ok} |")


if __name__ == "__main__":
    main()
