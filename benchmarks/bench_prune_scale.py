"""Prune time against the number of snapshots: time per snapshot should stay flat (linear scaling).

A PowerEMA of a ``Linear(2, 2)`` (sigma_rel 0.05 and 0.10) saves a snapshot at every update;
``planning.prune`` then keeps 0.05…0.15 to a fit error of 1e-3 and deletes the rest. The
times are wall seconds of one prune each (reading the headers, choosing, deleting), one thread.
Before the forward selection (emakit 0.1), prune ran a solve over every remaining snapshot
per removal tried: 100 snapshots took 6.4 s and 400 did not end in 600 s.

    python benchmarks/bench_prune_scale.py                 # 400 and 4000 snapshots (about a minute)
    python benchmarks/bench_prune_scale.py --counts 50 200 # smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import emakit
from emakit import planning


def make_run(directory: Path, count: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10))
    for _ in range(count):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        pema.update()
        pema.save_snapshot(directory)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[400, 4000])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"command: python benchmarks/{' '.join(['bench_prune_scale.py', *sys.argv[1:]])}")
    print(f"versions: torch {torch.__version__}, emakit {emakit.__version__}\n")
    print("| snapshots | kept | fit error after | prune s | ms per snapshot |")
    print("|---:|---:|---:|---:|---:|")
    for count in args.counts:
        with tempfile.TemporaryDirectory() as tmp:
            make_run(Path(tmp), count)
            start = time.perf_counter()
            report = planning.prune(tmp, sigma_rel=(0.05, 0.15), max_fit_error=1e-3)
            seconds = time.perf_counter() - start
        print(
            f"| {count} | {len(report.kept)} | {report.fit_error_after:.2e} | {seconds:.2f} | "
            f"{1e3 * seconds / count:.2f} |"
        )


if __name__ == "__main__":
    main()
