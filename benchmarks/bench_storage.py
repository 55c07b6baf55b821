"""Snapshot storage: fp32 vs fp16 (EDM2's choice) vs compact, in bytes, reconstruction error and speed.

A float64 random walk (the "weights") is averaged by a float64 PowerEMA tracking
sigma_rel 0.05 and 0.10, which saves the same snapshots three ways. A second PowerEMA
tracks every target length exactly (the truth). Reconstruction error is
``||reconstructed - truth|| / ||truth - final weights||``, the max over targets: untracked
lengths (0.03 ... 0.2), and separately the tracked ones (0.05, 0.10), where fp32 is nearly
exact and the target for compact is 1.2x the smallest fp32 error at an untracked length.

    python benchmarks/bench_storage.py                    # 1M params, 2000 steps, 40 snapshots
    python benchmarks/bench_storage.py --params 100000 --steps 400

``--demo-run DIR`` measures a finished training run instead (``emakit demo --out runs/demo``
leaves fp32 snapshots in ``runs/demo/run/phema``; the final weights are the ``model`` of
``checkpoint.pt`` beside it). Its snapshots are re-encoded as fp32, fp16 and compact
(``snapshots.write_snapshot``, with a ``snapshots.DeltaChain`` for compact, as
``PowerEMA.save_snapshot`` does). A run has no float64 truth at untracked lengths, so the
errors are of three kinds, all relative to ``||reference - final weights||``:

- *tracked* lengths: against the tracked profile itself (the last snapshot's fp32 average);
- *untracked* lengths (0.03 ... 0.2): the *encoding* error, against the reconstruction from
  the fp32 snapshots (fp32 is 0 by definition; ``compact error <= fp32 error + encoding
  error``);
- *held out*: each interior tracked profile (0.05 of the demo's 0.01, 0.05, 0.10) rebuilt
  from the other profiles alone (snapshots re-encoded without it), against its stored
  value: an untracked length with a true reference, so the one place where fp32 and
  compact errors compare directly. It stands in for "the smallest fp32 error at an
  untracked length" in the tracked-length target.

``many_tensors`` (the last compact row of ``run_all.py``) times reconstruction from fp32 and
compact snapshots of a model of 1000 small tensors, where each tensor's own costs show.

It also prunes a copy of the fp32 snapshots (``planning.prune``, 0.03:0.2, fit error 1e-3)
and measures the pruned reconstruction against the unpruned one.

Measured here (2 CPU cores, torch 2.13; speeds in fp32-equivalent MB/s; docs/posthoc.md):

``python benchmarks/bench_storage.py`` (float64 random walk, 1M params)::

    format   bytes    error, untracked (max)  error, tracked (max)     write / read MB/s
    fp32     1.000x   9.06e-4                 1.5e-7                    490 / 1072
    fp16     0.500x   8.68e-3 (9.59x)         1.2e-3 (77.4x the bound)  1046 / 1255
    compact  0.492x   9.10e-4 (1.01x)         1.52e-5 (1.00x)            65 / 340

``python benchmarks/bench_storage.py --demo-run /tmp/demo_full3/run/phema`` (``emakit demo
--out /tmp/demo_full3``: 8000 steps, 40 snapshots x (0.01, 0.05, 0.10), 1,378,624 params)::

    format   bytes    encoding error,       error, tracked  error, held out   write / read MB/s
                      untracked (max)       (max)           (0.05)
    fp32     1.000x   0                     2.8e-14         2.17e-3            754 / 664
    fp16     0.500x   5.0e-3 (at 0.03)      1.8e-3          2.79e-3 (1.29x)    524 / 719
    compact  0.489x   5.9e-5 (at 0.03)      5.4e-5          2.17e-3 (1.00x)     61 / 244

    fp32 pruned to fit error 1e-3 over 0.03:0.2: 28 of 40 snapshots removed, 0.300x the
    bytes, worst fit error 4.1e-6 -> 9.7e-4; weight error against the unpruned
    reconstruction 3.5e-3 at 0.03, 5-6e-4 from 0.06 to 0.12, 9.3e-3 at 0.2.

On the demo run compact meets the bytes and, at the held-out length, the error target; at
the tracked and untracked lengths the run gives no fp32 error to compare with (see the
caveats in docs/posthoc.md). Compact's error there is its quantisation noise, one step per
tensor (``min(rms / 8000, max / 40000)`` of the delta: the demo's deltas are heavier-tailed
than the random walk's; with ``max / 40000`` alone it was 0.465x, 1.2e-4 and 8.5e-5).
Speeds are from an idle machine; the figures of the latest run (under load) differ only in them.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import emakit
from _walk import error, walk
from emakit import planning, posthoc, snapshots

TRACKED = (0.05, 0.10)
UNTRACKED = (0.03, 0.04, 0.06, 0.08, 0.12, 0.15, 0.2)
FORMATS = {"fp32": {}, "fp16": {"dtype": torch.float16}, "compact": {"encoding": "compact"}}


def run(params: int, steps: int, snapshots: int, root: Path, seed: int = 0) -> list[dict]:
    """Write the three snapshot directories of one random walk and measure each; one row per format."""
    write_s = dict.fromkeys(FORMATS, 0.0)

    def save(pema: emakit.PowerEMA) -> None:
        for name, kwargs in FORMATS.items():
            start = time.perf_counter()
            pema.save_snapshot(root / name, **kwargs)
            write_s[name] += time.perf_counter() - start

    truth, final = walk(params, steps, snapshots, TRACKED + UNTRACKED, save, tracked=TRACKED, seed=seed)
    rows = []
    for name in FORMATS:
        infos = posthoc.list_snapshots(root / name)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # poor-fit warnings at 0.03: the same for every format
            sds = posthoc.reconstruct(infos, list(TRACKED + UNTRACKED), progress=False, dtype=torch.float64)
        read_s = time.perf_counter() - start
        errors = {s: error(sd["weight"], truth, s, final) for s, sd in zip(TRACKED + UNTRACKED, sds)}
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


def many_tensors(root: Path, tensors: int = 1000, numel: int = 100, count: int = 5, reps: int = 3) -> dict:
    """Median seconds to reconstruct every length from fp32 and from compact snapshots of a model of many small
    tensors (``count`` snapshots of ``tensors`` x ``numel``): what each tensor costs, which the walk's one large
    tensor does not show."""
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.p = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(numel)) for _ in range(tensors))
    params, pema = list(model.parameters()), emakit.PowerEMA(model, sigma_rels=TRACKED)
    for step in range(1, 10 * count + 1):
        with torch.no_grad():
            torch._foreach_add_(params, [torch.randn_like(p) for p in params], alpha=1e-2)
        pema.update()
        if step % 10 == 0:
            for name in ("fp32", "compact"):
                pema.save_snapshot(root / name, **FORMATS[name])
    times: dict[str, list[float]] = {"fp32": [], "compact": []}
    for _ in range(reps):  # round-robin: machine noise hits both alike
        for name in times:
            snapshots.clear_decoded_cache()  # each time from the keyframe, as a fresh process
            start = time.perf_counter()
            posthoc.reconstruct(root / name, sigma_rel=list(TRACKED + UNTRACKED), progress=False)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


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


# --------------------------------------------------------------------------- a finished training run

#: Pruning measured on a run: the range and target of ``emakit prune``.
PRUNE_RANGE, PRUNE_TO = (0.03, 0.2), 1e-3


def read_snapshot(info: snapshots.SnapshotInfo, profiles: list[int]) -> dict:
    """One stored snapshot as ``write_snapshot``'s arguments, keeping the given profiles."""
    reader = snapshots.open_tensors(info)
    try:
        averages = [{n: reader.get(f"avg.{j}/{n}") for n in info.averaged} for j in profiles]
        copies = {n: reader.get(f"copy/{n}") for n in info.copied}
        static = {n: reader.get(f"static/{n}") for n in info.static}
    finally:
        reader.close()
    return dict(
        t=info.t, num_updates=info.num_updates, sigma_rels=[info.sigma_rels[j] for j in profiles],
        gammas=[info.gammas[j] for j in profiles], averages=averages, copies=copies, static=static,
        model_dtypes=dict(info.model_dtypes), keys=list(info.keys), aliases=dict(info.aliases),
    )  # fmt: skip


def reencode(infos: list, out: Path, fmt: str, profiles: list[int]) -> float:
    """Write ``infos`` again into ``out`` in format ``fmt`` (a key of FORMATS); returns the seconds spent writing."""
    chain = snapshots.DeltaChain() if fmt == "compact" else None
    dtype = FORMATS[fmt].get("dtype", torch.float32)
    spent = 0.0
    for info in infos:
        fields = read_snapshot(info, profiles)
        start = time.perf_counter()
        snapshots.write_snapshot(out, dtype=dtype, chain=chain, **fields)
        spent += time.perf_counter() - start
    return spent


def final_weights(directory: Path, t: float) -> dict[str, torch.Tensor]:
    """The raw weights at the end of the run: the ``model`` of ``checkpoint.pt`` beside the snapshot directory."""
    path = directory.parent / "checkpoint.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("step") is not None and float(ckpt["step"]) != t:
        print(f"warning: {path} is at step {ckpt['step']}, the last snapshot at t={t:g}", file=sys.stderr)
    return ckpt["model"]


def relative_error(value: dict, reference: dict, final: dict, names: list[str]) -> float:
    """``||value - reference|| / ||reference - final||`` over the averaged tensors, in float64."""
    num = sum(float((value[n].double() - reference[n].double()).square().sum()) for n in names)
    den = sum(float((reference[n].double() - final[n].double()).square().sum()) for n in names)
    return (num / den) ** 0.5


def rebuild(directory: Path, targets: list[float]) -> tuple[list[dict], float, int]:
    """Reconstructions at ``targets`` in float64 (summed in float64), the seconds it took, the bytes read."""
    infos = posthoc.list_snapshots(directory)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # poor-fit warnings: the same for every format
        sds = posthoc.reconstruct(infos, targets, progress=False, dtype=torch.float64, accumulate=torch.float64)
    return sds, time.perf_counter() - start, sum(i.nbytes for i in infos)


def demo_run(directory: Path, root: Path) -> dict:
    """Re-encode a run's fp32 snapshots three ways (all profiles, and without the interior ones); measure each."""
    infos = posthoc.list_snapshots(directory)
    if any(i.encoding != "fp32" or i.dtype != torch.float32 or i.sharded for i in infos):
        raise SystemExit(f"{directory}: needs single-file fp32 snapshots (plain encoding)")
    tracked = list(infos[-1].sigma_rels)
    held = list(range(1, len(tracked) - 1))  # interior profiles: rebuilt from the others, their truth stored
    outer = [0, len(tracked) - 1]
    final, names = final_weights(directory, infos[-1].t), list(infos[-1].averaged)
    truth = read_snapshot(infos[-1], list(range(len(tracked))))["averages"]
    targets = tracked + [s for s in UNTRACKED if s not in tracked]
    rows, reference = [], None
    for fmt in FORMATS:
        write_s = reencode(infos, root / fmt, fmt, list(range(len(tracked))))
        sds, read_s, nbytes = rebuild(root / fmt, targets)
        reference = reference or sds  # fp32 first: the reference at untracked lengths
        row = {"format": fmt, "bytes": nbytes, "write_s": write_s, "read_s": read_s}
        row["tracked"] = {s: relative_error(sds[j], truth[j], final, names) for j, s in enumerate(tracked)}
        row["encoding"] = {
            s: relative_error(sds[k], reference[k], final, names) for k, s in enumerate(targets) if s not in tracked
        }
        if held:
            reencode(infos, root / f"{fmt}-outer", fmt, outer)
            sds, _, _ = rebuild(root / f"{fmt}-outer", [tracked[j] for j in held])
            row["held_out"] = {tracked[j]: relative_error(sd, truth[j], final, names) for j, sd in zip(held, sds)}
        rows.append(row)
    return {"rows": rows, "pruned": measure_prune(root / "fp32", targets, tracked, reference, final, names)}


def measure_prune(fp32_dir: Path, targets: list, tracked: list, reference: list, final: dict, names: list) -> dict:
    """Prune a copy of the fp32 snapshots to PRUNE_TO over PRUNE_RANGE; its weight error against the unpruned."""
    copy = fp32_dir.with_name("fp32-pruned")
    shutil.copytree(fp32_dir, copy)
    start = time.perf_counter()
    report = planning.prune(copy, sigma_rel=PRUNE_RANGE, max_fit_error=PRUNE_TO)
    prune_s = time.perf_counter() - start
    sds, _, _ = rebuild(copy, targets)
    errors = {s: relative_error(sd, ref, final, names) for s, sd, ref in zip(targets, sds, reference)}
    return {"report": report, "seconds": prune_s, "errors": errors, "tracked": tracked}


def demo_table(result: dict) -> str:
    """The run's figures: bytes, errors by kind, speed; then pruning."""
    rows, fp32 = result["rows"], result["rows"][0]
    mb = fp32["bytes"] / 1e6
    lines = [
        "| format | bytes | vs fp32 | encoding error, untracked (max) | error, tracked (max) | "
        "error, held out | write MB/s | read MB/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        held = ", ".join(f"{s:g}: {e:.3g}" for s, e in r.get("held_out", {}).items()) or "n/a"
        lines.append(
            f"| {r['format']} | {r['bytes']:,} | {r['bytes'] / fp32['bytes']:.3f}x | {max(r['encoding'].values()):.3g} | "
            f"{max(r['tracked'].values()):.3g} | {held} | {mb / r['write_s']:.0f} | {mb / r['read_s']:.0f} |"
        )
    lines += ["", "per length (error relative to |EMA - final weights|):", ""]
    lines += ["| format | " + " | ".join(f"{s:g}" for s in [*fp32["tracked"], *fp32["encoding"]]) + " |"]
    lines += ["|---|" + "---|" * (len(fp32["tracked"]) + len(fp32["encoding"]))]
    for r in rows:
        cells = [f"{e:.2g}" for e in [*r["tracked"].values(), *r["encoding"].values()]]
        lines.append(f"| {r['format']} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", verdict(rows), "", prune_lines(result["pruned"])])


def verdict(rows: list[dict]) -> str:
    """The issue's target, checked with what a run without float64 truth allows."""
    fp32, compact = rows[0], next(r for r in rows if r["format"] == "compact")
    text = f"compact: {compact['bytes'] / fp32['bytes']:.3f}x the bytes (target <= 0.5x)"
    if "held_out" in fp32:
        s = min(fp32["held_out"])
        base = fp32["held_out"][s]
        text += (
            f"; held-out {s:g}: {compact['held_out'][s] / base:.2f}x fp32's error (target <= 1.2x); "
            f"tracked: {max(compact['tracked'].values()) / base:.2f}x fp32's held-out error (target <= 1.2x); "
            f"untracked: encoding error up to {max(compact['encoding'].values()) / base:.2f}x fp32's held-out error"
        )
    return text + "."


def prune_lines(pruned: dict) -> str:
    rep = pruned["report"]
    worst = max(e for s, e in pruned["errors"].items() if s not in pruned["tracked"])
    return (
        f"fp32 pruned to fit error {PRUNE_TO:g} over {PRUNE_RANGE[0]:g}:{PRUNE_RANGE[1]:g}: removed "
        f"{len(rep.removed)} of {len(rep.removed) + len(rep.kept)} snapshots, {rep.bytes_before:,} -> "
        f"{rep.bytes_after:,} bytes ({rep.bytes_after / rep.bytes_before:.3f}x), worst fit error "
        f"{rep.fit_error_before:.2g} -> {rep.fit_error_after:.2g} ({pruned['seconds']:.1f} s); weight error "
        f"against the unpruned fp32 reconstruction, relative to |EMA - final|: "
        + ", ".join(f"{s:g}: {e:.2g}" for s, e in pruned["errors"].items())
        + f" (worst untracked {worst:.2g})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--snapshots", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--demo-run", type=Path, help="a finished run's fp32 snapshot directory, e.g. runs/demo/run/phema"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.demo_run is not None:
            text = demo_table(demo_run(args.demo_run, Path(tmp)))
        else:
            text = table(run(args.params, args.steps, args.snapshots, Path(tmp), args.seed), args.params)
    print(f"$ python {' '.join(sys.argv)}  (torch {torch.__version__}, emakit {emakit.__version__})\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
