"""Snapshot storage: fp32 vs fp16 (EDM2's choice) vs compact, in bytes, reconstruction error and speed.

A float64 random walk (the "weights") is averaged by a float64 PowerEMA tracking
sigma_rel 0.05 and 0.10, which saves the same snapshots three ways. A second PowerEMA
tracks every target length exactly (the truth). Reconstruction error is
``||reconstructed - truth|| / ||truth - final weights||``, the max over targets: untracked
lengths (0.03 ... 0.2), and separately the tracked ones (0.05, 0.10), where fp32 is nearly
exact and the target for compact is 1.2x the smallest fp32 error at an untracked length.

    python benchmarks/bench_storage.py                    # 1M params, 2000 steps, 40 snapshots
    python benchmarks/bench_storage.py --params 100000 --steps 400
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
from emakit import posthoc

TRACKED = (0.05, 0.10)
UNTRACKED = (0.03, 0.04, 0.06, 0.08, 0.12, 0.15, 0.2)
FORMATS = {"fp32": {}, "fp16": {"dtype": torch.float16}, "compact": {"encoding": "compact"}}


def run(params: int, steps: int, snapshots: int, root: Path, seed: int = 0) -> list[dict]:
    """Write the three snapshot directories of one random walk and measure each; one row per format."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(1, 1, bias=False)
    model.weight = torch.nn.Parameter(torch.zeros(params, 1, dtype=torch.float64))
    pema = emakit.PowerEMA(model, sigma_rels=TRACKED)
    truth = emakit.PowerEMA(model, sigma_rels=TRACKED + UNTRACKED)
    every = steps // snapshots
    write_s = dict.fromkeys(FORMATS, 0.0)
    for step in range(1, steps + 1):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight), alpha=1e-2)
        pema.update()
        truth.update()
        if step % every == 0:
            for name, kwargs in FORMATS.items():
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pema.save_snapshot(root / name, **kwargs)
                write_s[name] += time.perf_counter() - start
    final = model.weight.detach().clone()
    rows = []
    for name in FORMATS:
        infos = posthoc.list_snapshots(root / name)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # poor-fit warnings at 0.03: the same for every format
            sds = posthoc.reconstruct(infos, list(TRACKED + UNTRACKED), progress=False, dtype=torch.float64)
        read_s = time.perf_counter() - start
        errors = {}
        for s, sd in zip(TRACKED + UNTRACKED, sds):
            exact = truth.averaged_state_dict(s, dtype="model")["weight"]
            errors[s] = float((sd["weight"] - exact).norm() / (exact - final).norm())
        rows.append(
            {
                "format": name,
                "bytes": sum(i.nbytes for i in infos),
                "tracked": max(errors[s] for s in TRACKED),
                "untracked": max(errors[s] for s in UNTRACKED),
                "untracked_min": min(errors[s] for s in UNTRACKED),
                "write_s": write_s[name],
                "read_s": read_s,
            }
        )
    return rows


def table(rows: list[dict], numel: int) -> str:
    fp32 = rows[0]
    bound = 1.2 * fp32["untracked_min"]
    lines = [
        "| format | bytes | vs fp32 | error, untracked (max) | vs fp32 | error, tracked (max) | vs bound | "
        "write MB/s | read MB/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mb = fp32["bytes"] / 1e6  # throughput in fp32-equivalent megabytes
        lines.append(
            f"| {r['format']} | {r['bytes']:,} | {r['bytes'] / fp32['bytes']:.3f}x | {r['untracked']:.3g} | "
            f"{r['untracked'] / fp32['untracked']:.2f}x | {r['tracked']:.3g} | "
            f"{max(r['tracked'], fp32['untracked_min']) / fp32['untracked_min']:.2f}x | "
            f"{mb / r['write_s']:.0f} | {mb / r['read_s']:.0f} |"
        )
    lines.append(
        f"\nbound at tracked lengths: 1.2 x smallest fp32 error at an untracked length = {bound:.3g}; "
        f"'vs bound' is error / that smallest fp32 error (target <= 1.20x). {numel:,} params."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--snapshots", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args.params, args.steps, args.snapshots, Path(tmp), args.seed)
    print(f"$ python {' '.join(sys.argv)}  (torch {torch.__version__}, emakit {emakit.__version__})\n")
    print(table(rows, args.params))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
