"""What pausing Python's garbage collector saves when a model of many tensors is read or written.

emakit pauses automatic collection while it saves, reads, verifies or reconstructs
(``emakit/_files/collector.py``). This measures each of those calls on a model of
``--tensors`` small tensors (two PowerEMA profiles, ``--snapshots`` snapshots, an EMA saved
with DCP) with the pause (as shipped) and without it (``collector.ENABLED = False``),
interleaved repetitions, medians of wall time, two intra-op threads. A full collection
visits every object of the process, so the saving grows with what else the process holds
(``--ballast`` adds that many small objects, as a training script's own would).

    python benchmarks/bench_collector.py                  # 2000 tensors, 5 repetitions
    python benchmarks/bench_collector.py --tensors 200 --reps 3
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import emakit
from emakit import posthoc, verify
from emakit._files import collector


def _model(tensors: int, numel: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.p = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(numel)) for _ in range(tensors))
    return model


def _run(root: Path, tensors: int, numel: int, snapshots: int, compact: bool = True):
    """A PowerEMA and an EMA of a model of ``tensors`` x ``numel`` after ``snapshots`` snapshots into ``root/fp32``
    (and ``root/compact``)."""
    model = _model(tensors, numel)
    pema, ema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10)), emakit.EMA(model, decay=0.999)
    params = list(model.parameters())
    for _ in range(snapshots):
        with torch.no_grad():
            torch._foreach_add_(params, [torch.randn_like(p) for p in params], alpha=1e-2)
        pema.update()
        ema.update()
        pema.save_snapshot(root / "fp32")
        if compact:
            pema.save_snapshot(root / "compact", encoding="compact")
    return pema, ema


def reconstruct_ratio(root: Path, tensors: int = 2000, numel: int = 256, snapshots: int = 8, reps: int = 3) -> float:
    """Collecting / paused median seconds of a reconstruction (5 lengths) from fp32 snapshots: ``run_all.py``'s row."""
    _run(root, tensors, numel, snapshots, compact=False)
    infos = posthoc.list_snapshots(root / "fp32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # poorly supported lengths: a few snapshots only
        collecting, paused = measure(lambda: posthoc.reconstruct(infos, LENGTHS, progress=False), reps)
    return collecting / paused


LENGTHS = [0.03, 0.05, 0.08, 0.10, 0.15]


def calls(root: Path, tensors: int, numel: int, snapshots: int) -> dict[str, object]:
    """The measured calls, by row label, each ready to run again (savers write a fresh name each time)."""
    pema, ema = _run(root, tensors, numel, snapshots)
    ema.save(root / "ema")
    fresh = iter(range(1 << 30))
    lengths = LENGTHS
    fp32, compact = posthoc.list_snapshots(root / "fp32"), posthoc.list_snapshots(root / "compact")
    return {
        "PowerEMA.save_snapshot, fp32": lambda: pema.save_snapshot(root / f"s{next(fresh)}"),
        "PowerEMA.save_snapshot, compact": lambda: pema.save_snapshot(root / f"s{next(fresh)}", encoding="compact"),
        "posthoc.list_snapshots, fp32": lambda: posthoc.list_snapshots(root / "fp32"),
        "posthoc.reconstruct, fp32, 5 lengths": lambda: posthoc.reconstruct(fp32, lengths, progress=False),
        "posthoc.reconstruct, compact, 5 lengths": lambda: posthoc.reconstruct(compact, lengths, progress=False),
        "verify.verify, fp32 snapshots": lambda: verify.verify([root / "fp32"]),
        "EMA.save (DCP)": lambda: ema.save(root / f"e{next(fresh)}"),
        "EMA.load (DCP)": lambda: ema.load(root / "ema"),
    }


def measure(fn, reps: int) -> tuple[float, float]:
    """Median seconds of ``fn`` without and with the pause, interleaved."""
    times: dict[bool, list[float]] = {False: [], True: []}
    try:
        for _ in range(reps):
            for pause in (False, True):
                collector.ENABLED = pause
                start = time.perf_counter()
                fn()
                times[pause].append(time.perf_counter() - start)
    finally:
        collector.ENABLED = True
    return statistics.median(times[False]), statistics.median(times[True])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=2000)
    parser.add_argument("--numel", type=int, default=256)
    parser.add_argument("--snapshots", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--ballast", type=int, default=0, help="extra small objects the process holds")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    ballast = [[i] for i in range(args.ballast)]  # noqa: F841 (held: what a full collection must visit)
    start = time.perf_counter()
    gc.collect()
    full = time.perf_counter() - start
    print(f"$ python benchmarks/bench_collector.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"torch {torch.__version__}, emakit {emakit.__version__}; {len(gc.get_objects()):,} objects tracked, "
          f"a full collection {1e3 * full:.0f} ms\n")  # fmt: skip
    print("| call | collecting ms | paused ms | collecting / paused |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # poorly supported lengths: a few snapshots only
        for label, fn in calls(Path(tmp), args.tensors, args.numel, args.snapshots).items():
            collecting, paused = measure(fn, args.reps)
            print(f"| {label} | {1e3 * collecting:.0f} | {1e3 * paused:.0f} | {collecting / paused:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
