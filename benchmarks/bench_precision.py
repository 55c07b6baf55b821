"""Reconstruction error with the weighted sum in fp32 (default) vs float64 (``accumulate=torch.float64``).

A float64 random walk (the "weights") is averaged by a float64 PowerEMA tracking sigma_rel
0.05 and 0.10, saving fp32 snapshots; a second PowerEMA tracks every target exactly (the
truth). Error is ``||reconstructed - truth|| / ||truth - final weights||``, output in float64.

    python benchmarks/bench_precision.py                      # 200k params, 2000 steps, 40 snapshots
    python benchmarks/bench_precision.py --params 2000 --steps 200   # smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from _walk import error, walk
from emakit import posthoc

TARGETS = (0.03, 0.05, 0.06, 0.08, 0.10, 0.15, 0.2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=200_000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--snapshots", type=int, default=40)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"command: python benchmarks/{' '.join(['bench_precision.py', *sys.argv[1:]])}")
    print("| sigma_rel | error, fp32 sum | error, float64 sum | fp32 / float64 |")
    print("|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        truth, final = walk(args.params, args.steps, args.snapshots, TARGETS, lambda pema: pema.save_snapshot(root))
        for s in TARGETS:
            errors = []
            for accumulate in (torch.float32, torch.float64):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # poorly supported edges: the same for both
                    got = posthoc.reconstruct(root, sigma_rel=s, progress=False, dtype="float64", accumulate=accumulate)
                errors.append(error(got["weight"], truth, s, final))
            print(f"| {s:g} | {errors[0]:.3e} | {errors[1]:.3e} | {errors[0] / errors[1]:.2f} |")


if __name__ == "__main__":
    main()
