"""Every headline ratio of the README in one table, each beside its goal, so a regression shows at a glance.

Runs the benchmark scripts' own functions (their tables are read back by row label), in
one process except the distributed one (2 spawned ranks), on this machine:

    python benchmarks/run_all.py            # README scales, ~10 min on 2 cores
    python benchmarks/run_all.py --quick    # smaller models, fewer repetitions, ~2-3 min

Update ratios are CPU-time medians with one thread (bench_update.py, bench_power.py),
storage ratios wall-time medians of interleaved repetitions (bench_power.py,
bench_storage.py). ``--quick`` ratios are noisier and on smaller models (the update's large
tensors keep their 1M elements, 20 of them instead of 100); the README's figures come from
the full run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import emakit

ROOF = "roofline: one fp32 lerp_ of all params"
PEERS = ("torch AveragedModel", "ema-pytorch", "torch-ema", "diffusers")


def _rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows of ``text`` by their first cell (cells stripped)."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and len(cells) > 1 and not set(cells[1]) <= set("-:"):
            rows[cells[0]] = cells[1:]
    return rows


def _quiet(fn, *args) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn(*args)
    return out.getvalue()


def _ms(rows: dict, name: str) -> float | None:
    cells = rows.get(name)
    try:
        return float(cells[0]) if cells else None
    except ValueError:
        return None  # a peer that is not installed


def update_ratios(scale: float, reps: int) -> list[tuple]:
    from bench_update import run_scenario

    # Large tensors are of 1M elements at every scale; --quick takes 20 of them, not 100. (At 100k elements a
    # tensor, dispatching each one costs one thread ~5 us, a tenth of the 3 ms roofline: not what "large" measures.)
    count = max(1, int(100 * min(1.0, 2 * scale)))
    big = _rows(_quiet(run_scenario, "large", count, 1_000_000, torch.float32, reps, True))
    small = _rows(_quiet(run_scenario, "small", 2000, 1024, torch.float32, reps, True))
    bf16 = _rows(_quiet(run_scenario, "bf16", count, 1_000_000, torch.bfloat16, reps, True))
    peer = [ms for name, ms in ((n, _ms(small, n)) for n in small) if ms and name.startswith(PEERS)]
    out = [
        ("update, large fp32 tensors: roofline / emakit", _ms(big, ROOF) / _ms(big, "emakit EMA"), ">= 0.95"),
        ("update, 2000 small tensors: fastest peer / emakit", min(peer) / _ms(small, "emakit EMA") if peer else None,
         ">= 3"),
        ("update, 2000 small tensors, contiguous_parameters_: roofline / emakit",
         _ms(small, ROOF) / _ms(small, "emakit EMA + contiguous_parameters_"), ">= 0.8"),
        ("update, bf16 model + fp32 average: emakit / fp32 roofline", _ms(bf16, "emakit EMA") / _ms(bf16, ROOF),
         "<= 1.3"),
    ]  # fmt: skip
    located = _ms(big, "emakit EMA, locate_nonfinite=True")
    if located:
        out.append(("update, locate_nonfinite=True / plain (large fp32)", located / _ms(big, "emakit EMA"), "<= 1.3"))
    return out


def power_ratios(scale: float, reps: int) -> list[tuple]:
    from bench_power import bench_update, reconstruct_ratios

    rows = _rows(_quiet(bench_update, 100, max(1, int(500_000 * scale)), reps))
    two, separate = _ms(rows, "PowerEMA, two profiles (one pass)"), _ms(rows, "two separate EMAs")
    with tempfile.TemporaryDirectory() as tmp:
        r = reconstruct_ratios(50, 200_000, 20, max(7, reps // 2), Path(tmp))  # README scale; 7 reps: the read swings
    return [
        ("PowerEMA two profiles: one pass / two separate EMAs", two / separate, "< 1 (floor 5/6)"),
        (f"reconstruct (checksums {r['algorithm']}) / plain read", r["reconstruct"], ">= 0.7 (goal 0.9)"),
        ("emakit verify / plain read", r["verify"], ">= 0.8"),
    ]


def storage_ratios(quick: bool) -> list[tuple]:
    import bench_storage

    params, steps = (200_000, 800) if quick else (1_000_000, 2000)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32, _, compact = bench_storage.run(params, steps, 40, Path(tmp))
        many = bench_storage.many_tensors(Path(tmp) / "many")
    bound = fp32["untracked_min"]
    return [
        ("compact: bytes / fp32 bytes (random walk)", compact["bytes"] / fp32["bytes"], "<= 0.48"),
        ("compact: error / fp32 error, untracked lengths", compact["untracked"] / fp32["untracked"], "<= 1.2"),
        ("compact: error at tracked lengths / smallest fp32 error", max(compact["tracked"], bound) / bound, "<= 1.2"),
        ("compact: encode speed / fp32 write speed", fp32["write_s"] / compact["write_s"], ">= 0.5"),
        ("compact: decode speed / fp32 read speed", fp32["read_s"] / compact["read_s"], ">= 0.7"),
        ("compact: decode speed / fp32 read speed, 1000 small tensors", many["fp32"] / many["compact"], ">= 0.7"),
    ]


def collector_ratios() -> list[tuple]:
    import bench_collector

    with tempfile.TemporaryDirectory() as tmp:
        ratio = bench_collector.reconstruct_ratio(Path(tmp))
    return [("reconstruct, 2000 small fp32 tensors: garbage collector running / paused", ratio, ">= 1.2")]


def module_view_ratios(quick: bool, reps: int) -> list[tuple]:
    import bench_module_view

    rows = _rows(_quiet(bench_module_view.main, ["--reps", str(reps), *(["--layers", "4"] if quick else [])]))
    view = _ms(rows, "emakit averaged_module()(x)") / _ms(rows, "plain forward of the model (reference)")
    return [("module view forward / plain forward", view, "<= 1.1")]


def distributed_ratios(quick: bool, reps: int) -> list[tuple]:
    import bench_distributed

    rows = _rows(_quiet(bench_distributed.main, ["--reps", str(reps), *(["--layers", "4"] if quick else [])]))
    def row(prefix: str) -> list[str]:
        return next(cells for name, cells in rows.items() if name.startswith(prefix))

    sharded, gather, ddp = row("emakit EMA (FSDP2"), row("gather"), row("emakit EMA (DDP, replicated")
    return [
        ("distributed: EMA memory per rank, FSDP2 / replicated", float(sharded[0]) / float(ddp[0]), "<= 0.5 (2 ranks)"),
        ("distributed: update CPU, gather + replicated / FSDP2 shard-local", float(gather[1]) / float(sharded[1]),
         ">= 1"),
    ]  # fmt: skip


def _ok(value: float | None, goal: str) -> str:
    if value is None:
        return "n/a"
    op, number = goal.split()[0], float(goal.split()[1])
    return "ok" if {">=": value >= number, "<=": value <= number, "<": value < number}[op] else "MISSED"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller models and fewer repetitions (~2-3 min)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["update", "power", "storage", "collector", "view", "distributed"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    scale, reps = (0.1, 5) if args.quick else (1.0, 11)
    sections = {
        "update": lambda: update_ratios(scale, max(reps, 15)),  # milliseconds each: more repetitions cost little
        "power": lambda: power_ratios(scale, reps),
        "storage": lambda: storage_ratios(args.quick),
        "collector": collector_ratios,
        "view": lambda: module_view_ratios(args.quick, reps),
        "distributed": lambda: distributed_ratios(args.quick, reps),
    }
    print(f"$ python benchmarks/run_all.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, emakit {emakit.__version__}\n")
    print("| ratio | measured | goal | |")
    print("|---|---:|---|---|")
    start = time.perf_counter()
    for name, section in sections.items():
        if name in args.skip:
            continue
        for label, value, goal in section():
            shown = "n/a" if value is None else f"{value:.2f}"
            print(f"| {label} | {shown} | {goal} | {_ok(value, goal)} |", flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
