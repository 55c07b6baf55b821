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

import emakit
from emakit import posthoc

TARGETS = (0.03, 0.05, 0.06, 0.08, 0.10, 0.15, 0.2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=200_000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--snapshots", type=int, default=40)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1, bias=False)
    model.weight = torch.nn.Parameter(torch.zeros(args.params, 1, dtype=torch.float64))
    pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10))
    truth = emakit.PowerEMA(model, sigma_rels=TARGETS)
    every = args.steps // args.snapshots
    print(f"command: python benchmarks/{' '.join(['bench_precision.py', *sys.argv[1:]])}")
    print("| sigma_rel | error, fp32 sum | error, float64 sum | fp32 / float64 |")
    print("|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        for step in range(1, args.steps + 1):
            with torch.no_grad():
                model.weight.add_(torch.randn_like(model.weight), alpha=1e-2)
            pema.update()
            truth.update()
            if step % every == 0:
                pema.save_snapshot(root)
        final = model.weight.detach().clone()
        for s in TARGETS:
            want = truth.averaged_state_dict(sigma_rel=s)["weight"]
            errors = []
            for accumulate in (torch.float32, torch.float64):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # poorly supported edges: the same for both
                    got = posthoc.reconstruct(root, sigma_rel=s, progress=False, dtype="float64", accumulate=accumulate)
                errors.append(float((got["weight"] - want).norm() / (want - final).norm()))
            print(f"| {s:g} | {errors[0]:.3e} | {errors[1]:.3e} | {errors[0] / errors[1]:.2f} |")


if __name__ == "__main__":
    main()
