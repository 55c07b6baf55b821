"""Power EMA costs: two profiles in one pass vs one, and post-hoc reconstruction vs reading the files.

1. Update: ``PowerEMA`` with two profiles vs an ``EMA`` with one power profile vs two
   separate EMAs, fp32, medians of process CPU time with one thread, timed round-robin. The
   second profile re-reads each chunk of weights from cache, so the floor is 5 array passes
   against 3 for one profile (1.67x); two separate EMAs make 6 (2x).
2. Reconstruction: ``posthoc.reconstruct`` of one length vs a plain sequential read of the
   same snapshot files (both from the page cache, wall time, medians), and the resident
   memory it adds for 5 and for all snapshots (it should not grow with their number).

    python benchmarks/bench_power.py
    python benchmarks/bench_power.py --scale 0.01 --reps 1    # smoke run
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import emakit
from bench_update import _reset_peak, _status_kib, cpu_ms_medians, make_model
from emakit import posthoc, schedules, snapshots, verify


def bench_update(num_tensors: int, numel: int, reps: int) -> None:
    total = num_tensors * numel
    print(f"\n### update: {num_tensors} tensors x {numel} = {total / 1e6:.1f}M fp32 params\n")
    models = [make_model(num_tensors, numel, torch.float32) for _ in range(3)]
    one = emakit.EMA(models[0], schedule=schedules.power(sigma_rel=0.05))
    two = emakit.PowerEMA(models[1], sigma_rels=(0.05, 0.10))
    sep = [emakit.EMA(models[2], schedule=schedules.power(sigma_rel=s)) for s in (0.05, 0.10)]
    a, b = torch.randn(total), torch.randn(total)
    updates = {
        "roofline: one fp32 lerp_": lambda: a.lerp_(b, 1e-4),
        "EMA, one power profile": one.update,
        "PowerEMA, two profiles (one pass)": two.update,
        "two separate EMAs": lambda: [e.update() for e in sep],
    }
    for u in updates.values():
        u()
    med = cpu_ms_medians(updates, reps)
    base = med["EMA, one power profile"]
    print("| contender | ms / update | vs one profile |")
    print("|---|---:|---:|")
    for name, ms in med.items():
        print(f"| {name} | {ms:.2f} | {ms / base:.2f} |")


def _wall_median(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _read_all(paths: list[Path]) -> int:
    """A plain sequential read of ``paths``, 16 MiB at a time into one buffer (``f.read`` into fresh bytes
    objects swung between 0.15 and 0.49 s here, with the page faults of new memory)."""
    n, buf = 0, bytearray(1 << 24)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while got := f.readinto(buf):
                n += got
    return n


def reconstruct_ratios(num_tensors: int, numel: int, num_snapshots: int, reps: int, directory: Path) -> dict:
    """Wall-time medians of a plain read, ``reconstruct`` and ``verify`` of the same files, interleaved rep by rep."""
    model = make_model(num_tensors, numel, torch.float32)
    pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10))
    for _ in range(num_snapshots):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        pema.update(dt=100)
        pema.save_snapshot(directory)
    os.sync()  # the files on disk before timing: writing 1.5 GB back competes with the reads for a minute after
    paths = snapshots.snapshot_paths(directory)
    infos = posthoc.list_snapshots(directory)
    steps = {
        "read": lambda: _read_all(paths),
        "reconstruct": lambda: posthoc.reconstruct(infos, sigma_rel=0.08, progress=False),
        "verify": lambda: verify.verify([directory]),
    }
    _read_all(paths)  # warm the page cache
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"nbytes": sum(p.stat().st_size for p in paths), "seconds": med, "algorithm": infos[0].checksum_algorithm,
            "reconstruct": med["read"] / med["reconstruct"], "verify": med["read"] / med["verify"]}  # fmt: skip


def bench_reconstruct(num_tensors: int, numel: int, num_snapshots: int, reps: int) -> None:
    total = num_tensors * numel
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        r = reconstruct_ratios(num_tensors, numel, num_snapshots, reps, directory)
        nbytes, sec = r["nbytes"], r["seconds"]
        print(
            f"\n### reconstruct: {num_snapshots} snapshots x 2 profiles x {total / 1e6:.1f}M params "
            f"= {nbytes / 2**30:.2f} GiB (page cache, checksums {r['algorithm']}, {_checksum_threads()} "
            f"checksum threads)\n"
        )
        print("| step | seconds | GiB/s | vs plain read |")
        print("|---|---:|---:|---:|")
        for name, label in (("read", "plain sequential read of the files"), ("reconstruct",
                            "posthoc.reconstruct, one length"), ("verify", "emakit verify of the directory")):  # fmt: skip
            print(f"| {label} | {sec[name]:.3f} | {nbytes / sec[name] / 2**30:.2f} | {sec['read'] / sec[name]:.2f} |")
        infos = posthoc.list_snapshots(directory)
        out_mib = total * 4 / 2**20
        print(f"\nresident memory added by reconstruct (one output = {out_mib:.1f} MiB):\n")
        print("| snapshots used | peak extra MiB |")
        print("|---:|---:|")
        for count in sorted({min(5, len(infos)), len(infos)}):
            gc.collect()
            _trim()  # else the output lands in memory the allocator kept resident from earlier runs: not counted
            if not _reset_peak():
                print("| n/a (no /proc/self/clear_refs) | |")
                break
            before = _status_kib("VmRSS")
            sd = posthoc.reconstruct(infos[:count], sigma_rel=0.08, progress=False)
            peak = (_status_kib("VmHWM") - before) / 1024
            del sd
            print(f"| {count} | {peak:.1f} |")


def _trim() -> None:
    """Hand the memory the C allocator keeps free back to the system (glibc's ``malloc_trim``; elsewhere nothing)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _checksum_threads() -> int:
    from emakit._files import checksums

    return checksums.pool()._max_workers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"command: python benchmarks/{' '.join(['bench_power.py', *sys.argv[1:]])}")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, emakit {emakit.__version__}")
    s = args.scale
    bench_update(100, max(1, int(500_000 * s)), args.reps)
    bench_reconstruct(50, max(1, int(200_000 * s)), 20, max(1, args.reps // 3))


if __name__ == "__main__":
    main()
