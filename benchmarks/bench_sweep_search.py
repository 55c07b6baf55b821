"""Golden-section search vs the full sweep, on a finished ``emakit demo`` run (also a quick one).

The demo's sweep scores every EMA length of its grid (``demo.SWEEP``, from the shortest
tracked profile up); its full mode then runs the search itself (``report.json``'s
``search``). This script runs ``posthoc.sweep(..., search=True)`` over the same range on any
finished run, with the demo's own metric (same classifier seed, same sampling seed), and
compares its best with the sweep's best from ``report.json``: evaluations, best
``sigma_rel``, metric, whether the two are within the metric's seed-to-seed noise, and the
seconds it takes. It first re-scores the raw weights to check that the metric reproduces
the report.

    emakit demo --out runs/demo                          # the run: report.json + run/
    python benchmarks/bench_sweep_search.py runs/demo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import emakit
from emakit import posthoc
from emakit._cli import demo
from emakit.recipes import diffusion


def load_run(directory: Path) -> tuple[dict, diffusion.Config, torch.nn.Module]:
    """The demo's report, its recipe config, and the trained model (raw weights) from ``run/checkpoint.pt``."""
    report = json.loads((directory / "report.json").read_text())
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in report["config"].items()}
    cfg = diffusion.Config(**fields)
    model = diffusion.Denoiser(cfg.hidden)
    ckpt = torch.load(directory / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model"])
    return report, cfg, model


def measure(directory: Path, seed: int) -> dict:
    """Run the search on the demo run in ``directory``; returns the comparison with its full sweep."""
    report, cfg, model = load_run(directory)
    plan = demo.FULL if report["mode"] == "full" else demo.QUICK
    score, _ = demo.make_scorer(model, plan, cfg, "cpu", seed=seed)
    raw = next(r for r in report["results"] if r["name"] == "raw")["metric"]
    start = time.perf_counter()
    again = score()[0]
    sample_s = time.perf_counter() - start
    swept = [r for r in report["results"] if "fit_error" in r]  # the post-hoc rows: the full sweep
    best = min(swept, key=lambda r: r["metric"])
    full = {"sigma_rel": best["sigma_rel"], "metric": best["metric"], "evaluations": len(swept)}
    snaps = posthoc.list_snapshots(directory / "run" / "phema")
    grid = [r["sigma_rel"] for r in swept]
    found = demo.search_against_sweep(snaps, grid, lambda m: score()[0], model, full)
    found["within_noise"] = abs(found["metric"] - full["metric"]) <= report["noise"]
    return {**found, "noise": report["noise"], "raw": raw, "raw_again": again, "sample_s": sample_s}


def summary(r: dict) -> str:
    points = ", ".join(f"{s:.4g}" for s in r["points"])
    return "\n".join(
        [
            f"metric reproduced: raw weights {r['raw_again']:.4f} (report: {r['raw']:.4f}); "
            f"one evaluation without reconstruction {r['sample_s']:.1f} s",
            f"full sweep: {r['sweep_evaluations']} evaluations, best sigma_rel={r['sweep_sigma_rel']:g} "
            f"metric {r['sweep_metric']:.2f}",
            f"search:     {r['evaluations']} evaluations ({points}), best sigma_rel={r['sigma_rel']:.4g} "
            f"metric {r['metric']:.2f}, {r['seconds']:.1f} s (sampling about {r['evaluations'] * r['sample_s']:.0f} s "
            f"of it, the rest reconstructing one length at a time)",
            f"|search - full| = {abs(r['metric'] - r['sweep_metric']):.2f}, noise {r['noise']:.2f}: "
            f"{'within' if r['within_noise'] else 'OUTSIDE'} the noise, with "
            f"{r['evaluations'] / r['sweep_evaluations']:.2f}x the evaluations",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="an emakit demo output directory (holds report.json and run/)")
    parser.add_argument("--seed", type=int, default=0, help="the demo's seed (its classifier's)")
    args = parser.parse_args(argv)
    result = measure(args.run, args.seed)
    print(f"$ python {' '.join(sys.argv)}  (torch {torch.__version__}, emakit {emakit.__version__})\n")
    print(summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
