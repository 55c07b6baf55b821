"""The ``emakit`` command line (also ``python -m emakit``).

emakit inspect run/phema
emakit reconstruct run/phema --sigma-rel 0.03,0.05,0.08 --out run/ema
emakit reconstruct run/phema --sigma-rel 0.02:0.20:0.01 --out run/ema --dtype float16
emakit reconstruct run/phema --halflife 2000 --out run/ema      # a classic EMA, fitted
emakit export run/phema --out archive/phema                      # sharded (DCP) -> single files
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from . import __version__
from ._atomic import write_then_rename


class CommandError(Exception):
    """A user error: printed without a traceback, exit status 2."""


def parse_values(text: str) -> list[float]:
    """``"0.03,0.05"`` or ``"0.02:0.2:0.01"`` (inclusive range) or a mix, to a sorted list of floats.

    >>> parse_values("0.1,0.02:0.04:0.01")
    [0.02, 0.03, 0.04, 0.1]
    """
    values: set[float] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if ":" in part:
                start, stop, step = (float(x) for x in part.split(":"))
                if not step > 0 or stop < start:
                    raise ValueError
                n = int(math.floor((stop - start) / step + 1e-9))
                values.update(round(start + i * step, 10) for i in range(n + 1))
            else:
                values.add(float(part))
        except ValueError:
            raise CommandError(f"cannot read {part!r}: expected numbers like 0.05 or ranges start:stop:step") from None
    if not values:
        raise CommandError(f"no values in {text!r}")
    return sorted(values)


def _label(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".") if value >= 1e-4 else f"{value:.3g}"


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import posthoc

    snaps = posthoc.list_snapshots(args.directory)
    first = snaps[0]
    numel = sum(math.prod(first.shapes[n]) for n in first.averaged)
    reliable = posthoc.reliable_range(snaps)
    summary = {
        "directory": str(args.directory),
        "snapshots": len(snaps),
        "t_first": snaps[0].t,
        "t_last": snaps[-1].t,
        "profiles": sorted({(s, g) for info in snaps for s, g in zip(info.sigma_rels, info.gammas)}),
        "dtype": str(first.dtype).removeprefix("torch."),
        "averaged_tensors": len(first.averaged),
        "averaged_elements": numel,
        "copied_tensors": len(first.copied),
        "static_tensors": len(first.static),
        "total_bytes": sum(s.nbytes for s in snaps),
        "reliable_sigma_rel": reliable,
        "files": [{"t": s.t, "file": s.path.name, "bytes": s.nbytes} for s in snaps],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['directory']}: {len(snaps)} snapshots, t = {snaps[0].t:g} … {snaps[-1].t:g}")
    for s, g in summary["profiles"]:
        print(f"  profile sigma_rel={s:.4f} (gamma={g:.4f})")
    print(
        f"  {len(first.averaged)} averaged tensors ({numel:,} elements per profile), {len(first.copied)} copied, "
        f"{len(first.static)} static; stored as {summary['dtype']}"
    )
    print(f"  size: {summary['total_bytes'] / 2**20:.1f} MiB")
    if reliable:
        print(
            f"  reliable sigma_rel range at t={snaps[-1].t:g}: {reliable[0]:.3f} … {reliable[1]:.3f} "
            f"(relative profile error <= {posthoc.FIT_ERROR_WARN:g})"
        )
    else:
        print("  no sigma_rel is reconstructed reliably from these snapshots")
    if args.verbose:
        for s in snaps:
            print(f"    t={s.t:<12g} {s.path.name}  {s.nbytes / 2**20:.1f} MiB")
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    import torch

    from . import posthoc
    from .snapshots import _safetensors

    safetensors, _ = _safetensors()
    targets: list[tuple[str, dict]] = []
    for s in parse_values(args.sigma_rel) if args.sigma_rel else []:
        targets.append((f"sigma_rel-{_label(s)}", {"sigma_rel": s}))
    for d in parse_values(args.decay) if args.decay else []:
        targets.append((f"decay-{d:g}", {"decay": d}))
    for h in parse_values(args.halflife) if args.halflife else []:
        targets.append((f"halflife-{h:g}", {"halflife": h}))
    if not targets:
        raise CommandError("give at least one of --sigma-rel, --decay, --halflife")
    out = Path(args.out)
    paths = [out / f"ema-{name}.safetensors" for name, _ in targets]
    existing = [p for p in paths if p.exists()]
    if existing and not args.overwrite:
        raise CommandError(f"{existing[0]} exists; pass --overwrite to replace it")
    snaps = posthoc.list_snapshots(args.directory)
    # Solve everything first: a bad request fails before any file is read or written.
    solutions = [posthoc.solve_coefficients(snaps, t=args.t, warn=False, **kw) for _, kw in targets]
    sigma = [kw["sigma_rel"] for _, kw in targets if "sigma_rel" in kw]
    results: list[dict] = []
    if sigma:
        results += posthoc.reconstruct(snaps, sigma_rel=sigma, t=args.t, dtype=args.dtype, progress=not args.quiet)
    for _, kw in targets:
        if "sigma_rel" not in kw:
            results.append(posthoc.reconstruct(snaps, t=args.t, dtype=args.dtype, progress=not args.quiet, **kw))
    out.mkdir(parents=True, exist_ok=True)
    writes = []
    for path, sol, sd in zip(paths, solutions, results):
        tensors = {k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}
        meta = {
            "format": "emakit.ema",
            "target": sol.target,
            "t": repr(sol.t),
            "fit_error": repr(sol.fit_error),
            "noise_gain": repr(sol.noise_gain),
            "snapshots": str(len(sol.snapshots)),
            "source": str(Path(args.directory).resolve()),
        }
        writes.append(
            (
                path,
                lambda tmp, tensors=tensors, meta=meta: safetensors.torch.save_file(tensors, str(tmp), metadata=meta),
            )
        )
    write_then_rename(writes)  # all files or none
    for path, sol in zip(paths, solutions):
        print(f"{path}  {sol.target}  t={sol.t:g}  fit_error={sol.fit_error:.2e}  noise_gain={sol.noise_gain:.2f}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from . import demo

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out is None:  # keep earlier demo runs: take the first free runs/demo, runs/demo-2, ...
        args.out = next(
            p for p in (f"runs/demo{'' if i == 1 else f'-{i}'}" for i in range(1, 10**6)) if not Path(p).exists()
        )
    report = demo.run(args.out, quick=args.quick, seed=args.seed, overrides=args.overrides, progress=not args.quiet)
    out = Path(args.out)
    best = report["best"]
    raw = next(r for r in report["results"] if r["name"] == "raw")
    print(f"\n{report['metric_name']} (lower is better, seed-to-seed noise {report['noise']:.2f}):")
    for r in report["results"]:
        print(f"  {r['name']:<18} {r['metric']:8.2f}{'   <- best' if r == best else ''}")
    print(
        f"best: {best['name']} ({best['metric']:.2f} vs raw {raw['metric']:.2f}); {report['wall_seconds']:.0f} s in all"
    )
    for name in ("report.md", "report.json", "sweep.png", "samples_raw.png", "samples_ema.png"):
        print(f"  {out / name}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from . import snapshots

    sources = [args.path] if Path(args.path).name.endswith(".dcp") else snapshots.snapshot_paths(args.path)
    sharded = [Path(p) for p in sources if Path(p).is_dir()]
    if not sharded:
        raise CommandError(f"{args.path}: no sharded snapshots (phema-*.dcp) to export")
    for path in sharded:
        out = snapshots.export(path, args.out)
        if not args.quiet:
            print(f"{path} -> {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emakit", description="Averaged model weights for PyTorch training.")
    parser.add_argument("--version", action="version", version=f"emakit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inspect", help="list the snapshots of a power-EMA directory and what they support")
    p.add_argument("directory", help="directory of snapshots (phema-*.safetensors files or phema-*.dcp directories)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("-v", "--verbose", action="store_true", help="list every snapshot file")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("reconstruct", help="rebuild EMAs of chosen lengths from power-EMA snapshots")
    p.add_argument("directory", help="directory of snapshots (phema-*.safetensors files or phema-*.dcp directories)")
    p.add_argument("--sigma-rel", help="power-EMA lengths: 0.05,0.1 or a range 0.02:0.2:0.01")
    p.add_argument("--decay", help="classic EMAs by per-step decay (fitted; see the fit error)")
    p.add_argument("--halflife", help="classic EMAs by half-life, in the snapshots' time unit (fitted)")
    p.add_argument("--t", type=float, default=None, help="reconstruct at this time (default: the last snapshot)")
    p.add_argument("--out", required=True, help="output directory: one ema-<length>.safetensors per length")
    p.add_argument("--dtype", default="model", help="'model' (default: the model's dtypes), float32, float16, ...")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_reconstruct)

    p = sub.add_parser("export", help="write sharded (DCP) snapshots as single safetensors files, for storage")
    p.add_argument("path", help="a phema-*.dcp snapshot, or a directory of them")
    p.add_argument("--out", required=True, help="directory for the phema-*.safetensors files")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("demo", help="train a small diffusion model, sweep EMA lengths post hoc, write a report")
    p.add_argument("--out", default=None, help="output directory (default: runs/demo, or runs/demo-2, ... if taken)")
    p.add_argument("--quick", action="store_true", help="about a minute instead of a few")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe config overrides, e.g. steps=4000")
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .snapshots import SnapshotError

    try:
        return args.run(args)
    except (CommandError, SnapshotError, ValueError, ImportError, FileExistsError) as e:
        print(f"emakit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
