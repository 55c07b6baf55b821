"""Pruning fp32 and compact snapshots of the same run: files removed, bytes, fit and weight error.

A float64 random walk (the "weights") is averaged by a float64 PowerEMA tracking sigma_rel
0.05 and 0.10, which saves every snapshot twice: fp32 and compact. A second PowerEMA tracks
the target lengths exactly (the truth). Both directories are pruned over 0.05…0.15 to a
fit error of 1e-3; for compact ones, prune first rewrites the kept deltas whose reference it
removes as (lossless) keyframes. Weight error is ``||reconstructed - truth|| / ||truth -
final weights||``, the max over the targets, before and after.

    python benchmarks/bench_prune.py                         # 1M params, 2000 steps, 40 snapshots
    python benchmarks/bench_prune.py --params 10000 --steps 400   # smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import emakit
from _walk import error, walk
from emakit import planning, posthoc

TARGETS = (0.05, 0.06, 0.08, 0.10, 0.12, 0.15)


def weight_error(directory: Path, truth: emakit.PowerEMA, final: torch.Tensor) -> float:
    worst = 0.0
    for s in TARGETS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # poorly supported lengths after pruning: that is the point
            got = posthoc.reconstruct(directory, sigma_rel=s, progress=False, dtype=torch.float64)["weight"]
        worst = max(worst, error(got, truth, s, final))
    return worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--snapshots", type=int, default=40)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"command: python benchmarks/{' '.join(['bench_prune.py', *sys.argv[1:]])}")
    print("| snapshots | removed | rewritten as keyframes | MiB before → after | fit error before → after "
          "| weight error before → after | prune s |")  # fmt: skip
    print("|---|---:|---:|---|---|---|---:|")
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)

        def save(pema: emakit.PowerEMA) -> None:
            pema.save_snapshot(root / "fp32")
            pema.save_snapshot(root / "compact", encoding="compact")

        truth, final = walk(args.params, args.steps, args.snapshots, TARGETS, save)
        for name in ("fp32", "compact"):
            before = weight_error(root / name, truth, final)
            start = time.perf_counter()
            r = planning.prune(root / name, sigma_rel=(0.05, 0.15), max_fit_error=1e-3)
            seconds = time.perf_counter() - start
            after = weight_error(root / name, truth, final)
            print(
                f"| {name} | {len(r.removed)} of {len(r.removed) + len(r.kept)} | {len(r.rewritten)} | "
                f"{r.bytes_before / 2**20:.1f} → {r.bytes_after / 2**20:.1f} | {r.fit_error_before:.1e} → "
                f"{r.fit_error_after:.1e} | {before:.2e} → {after:.2e} | {seconds:.1f} |"
            )


if __name__ == "__main__":
    main()
