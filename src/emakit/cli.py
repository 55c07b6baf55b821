"""The ``emakit`` command line (also ``python -m emakit``).

emakit inspect run/phema
emakit reconstruct run/phema --sigma-rel 0.03,0.05,0.08 --out run/ema
emakit reconstruct run/phema --sigma-rel 0.02:0.20:0.01 --out run/ema --dtype float16
emakit reconstruct run/phema --halflife 2000 --out run/ema      # a classic EMA, fitted
emakit export run/phema --out archive/phema                      # sharded -> single files
emakit verify run/phema run/ema.pt                               # readable, complete, finite?
emakit plan --steps 100000 --sigma-rel 0.03:0.2 --max-fit-error 1e-3  # profiles + interval, fewest bytes
emakit prune run/phema --sigma-rel 0.05:0.15 --max-fit-error 1e-3 --dry-run
emakit sweep run/phema --eval mytask:fid --model mytask:make_model --search --out run/sweep

Every bad argument or unreadable input is one line on stderr and exit status 2 (``verify``:
1 when it found problems). Sharded snapshots written by emakit 0.1 (``phema-*.dcp``) hold a
pickled DCP ``.metadata``: the commands that read them need ``--trust``. Today's sharded
snapshots (``phema-*.shards``) are safetensors and JSON, read without it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

from . import __version__
from ._cli.args import (
    MAX_VALUES,
    CommandError,
    _directory,
    _dtype,
    _fit_error,
    _load_callable,
    _one_line,
    _output_directory,
    _Parser,
    _positive_int,
    _positive_time,
    _refuse_untrusted,
    _seed,
    _sigma_range,
    _trust,
    _UsageError,
    _write_failure,
    parse_values,
    untrusted_message,
)
from ._files.atomic import write_then_rename

_SNAPSHOT_DIR = "a directory of snapshots (phema-*.safetensors files or phema-*.shards / .dcp directories)"


def _label(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".") if value >= 1e-4 else f"{value:.3g}"


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import posthoc

    snaps = posthoc.list_snapshots(_directory(args.directory, _SNAPSHOT_DIR))  # headers only: no trust needed
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
        "files": [
            {
                "t": s.t,
                "file": s.path.name,
                "bytes": s.nbytes,
                "encoding": s.encoding,
                "reference": s.reference,
                "form": _form(s),
            }
            for s in snaps
        ],
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
    encodings = sorted({s.encoding for s in snaps})
    forms = {f: sum(_form(s) == f for s in snaps) for f in sorted({_form(s) for s in snaps})}
    print(
        f"  size: {summary['total_bytes'] / 2**20:.1f} MiB; encoding: {', '.join(encodings)}; "
        + ", ".join(f"{n} {f}" for f, n in forms.items())
    )
    if reliable:
        print(
            f"  reliable sigma_rel range at t={snaps[-1].t:g}: {reliable[0]:.3f} … {reliable[1]:.3f} "
            f"(relative profile error <= {posthoc.FIT_ERROR_WARN:g})"
        )
    else:
        print("  no sigma_rel is reconstructed reliably from these snapshots")
    if args.verbose:
        for s in snaps:
            how = (
                s.encoding
                if s.encoding != "compact"
                else ("compact keyframe" if s.reference is None else f"compact delta to t={s.reference:g}")
            )
            print(f"    t={s.t:<12g} {s.path.name}  {s.nbytes / 2**20:.1f} MiB  {how}, {_form(s)}")
    return 0


def _form(info) -> str:
    """What holds a snapshot: one file, per-rank parts, or (emakit 0.1) a DCP directory."""
    if not info.sharded:
        return "single-file"
    return "sharded (DCP, pickled metadata)" if info.pickled else "sharded (safetensors parts)"


def cmd_reconstruct(args: argparse.Namespace) -> int:
    import torch

    from . import posthoc
    from .snapshots import _safetensors

    safetensors, _ = _safetensors()
    targets: list[tuple[str, dict]] = []
    for s in parse_values(args.sigma_rel, "--sigma-rel") if args.sigma_rel is not None else []:
        targets.append((f"sigma_rel-{_label(s)}", {"sigma_rel": s}))
    for d in parse_values(args.decay, "--decay") if args.decay is not None else []:
        targets.append((f"decay-{d:g}", {"decay": d}))
    for h in parse_values(args.halflife, "--halflife") if args.halflife is not None else []:
        targets.append((f"halflife-{h:g}", {"halflife": h}))
    if not targets:
        raise CommandError("give at least one of --sigma-rel, --decay, --halflife")
    if len(targets) > MAX_VALUES:
        raise CommandError(f"{len(targets)} EMA lengths requested in all; at most {MAX_VALUES} are allowed")
    directory = _directory(args.directory, _SNAPSHOT_DIR)
    out = _output_directory(args.out)
    paths = [out / f"ema-{name}.safetensors" for name, _ in targets]
    existing = [p for p in paths if p.exists()]
    if existing and not args.overwrite:
        raise CommandError(f"{existing[0]} exists; pass --overwrite to replace it")
    snaps = posthoc.list_snapshots(directory)
    # Solve everything first: a bad request fails before any file is read or written.
    solutions = [posthoc.solve_coefficients(snaps, t=args.t, warn=False, **kw) for _, kw in targets]
    used = {info.path: info for sol in solutions for info in sol.snapshots}
    _refuse_untrusted([p for p, info in sorted(used.items()) if info.pickled], args.trust)
    trust = _trust(posthoc.reconstruct, args.trust)
    sigma = [kw["sigma_rel"] for _, kw in targets if "sigma_rel" in kw]
    results: list[dict] = []
    if sigma:
        results += posthoc.reconstruct(
            snaps, sigma_rel=sigma, t=args.t, dtype=args.dtype, progress=not args.quiet, **trust
        )
    for _, kw in targets:
        if "sigma_rel" not in kw:
            results.append(
                posthoc.reconstruct(snaps, t=args.t, dtype=args.dtype, progress=not args.quiet, **kw, **trust)
            )
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
            "source": str(directory.resolve()),
        }
        writes.append(
            (path, _saving(path, lambda tmp, t=tensors, m=meta: safetensors.torch.save_file(t, str(tmp), metadata=m)))
        )
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        write_then_rename(writes)  # all files or none
    except OSError as e:  # fsync or rename (a write's own failures are already CommandErrors)
        raise _write_failure(out, e) from None
    except CommandError:
        if created and not any(out.iterdir()):
            out.rmdir()  # leave nothing behind
        raise
    for path, sol in zip(paths, solutions):
        print(f"{path}  {sol.target}  t={sol.t:g}  fit_error={sol.fit_error:.2e}  noise_gain={sol.noise_gain:.2f}")
    return 0


def _saving(path: Path, write):
    """``write(tmp)``, with a failure reported as one line naming ``path`` (the final name)."""

    def run(tmp: Path) -> None:
        try:
            write(tmp)
        except Exception as e:  # safetensors raises its own SafetensorError for I/O errors
            raise _write_failure(path, e) from None

    return run


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from ._cli import demo

    for item in args.overrides:  # the recipe parses numbers with float(): refuse nan and inf here
        key, _, value = item.partition("=")
        for part in value.split(","):
            try:
                number = float(part)
            except ValueError:
                continue
            if not math.isfinite(number):
                raise CommandError(f"override {item!r}: {key} must be finite, got {part!r}")
    if args.out is not None:
        _output_directory(args.out)
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
    for name in report.get("files", ("report.md", "report.json", "sweep.png")):
        print(f"  {out / name}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from . import snapshots
    from .snapshots import SnapshotError

    source = Path(args.path)
    if source.name.endswith((".dcp", ".shards")):
        sharded = [_directory(source, "a sharded snapshot (a phema-*.shards or .dcp directory)")]
    else:
        sharded = [p for p in snapshots.snapshot_paths(_directory(source, _SNAPSHOT_DIR)) if p.is_dir()]
    if not sharded:
        raise CommandError(f"{source}: no sharded snapshots (phema-*.shards or .dcp) to export")
    out = _output_directory(args.out)
    infos = [snapshots.read_info(p) for p in sharded]  # every header is checked before anything is written
    targets = [out / snapshots.file_name(info.t) for info in infos]
    existing = [p for p in targets if p.exists()]
    if existing:
        raise CommandError(
            f"{existing[0]} exists; export never replaces a snapshot (remove it or choose another --out)"
        )
    _refuse_untrusted([info.path for info in infos if info.pickled], args.trust)
    trust = _trust(snapshots.export, args.trust)
    for path, target in zip(sharded, targets):
        try:
            snapshots.export(path, out, **trust)
        except SnapshotError:
            raise
        except Exception as e:  # safetensors' SafetensorError or an OSError: the write failed
            raise _write_failure(target, e) from None
        if not args.quiet:
            print(f"{path} -> {target}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from . import verify

    for path in args.paths:
        path = Path(path)
        if not path.exists():
            raise CommandError(
                f"{path}: no such file or directory; expected a snapshot, a snapshot directory or a checkpoint"
            )
        if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
            raise CommandError(f"{path}: permission denied")
    if not args.trust:
        untrusted = verify.needs_trust(args.paths)
        if untrusted:
            path, kind = untrusted[0]
            raise CommandError(untrusted_message(path, kind))
    problems = verify.verify(args.paths, trust=args.trust)
    for line in problems:
        print(line)
    checked = f"{len(args.paths)} path{'s' if len(args.paths) != 1 else ''} checked"
    print(
        f"{checked}: {len(problems)} problem{'s' if len(problems) != 1 else ''}" if problems else f"{checked}: all good"
    )
    return 1 if problems else 0


def _layout_line(name: str, layout) -> str:
    profiles = ",".join(_label(s) for s in layout.sigma_rels)
    missed = "" if layout.meets else "  (misses the target)"
    return (
        f"  {name:<5} profiles {profiles:<24} every {layout.interval:g} steps ({layout.snapshots} snapshots)  "
        f"{layout.bytes_per_parameter} bytes/parameter  worst fit error {layout.fit_error:.2e}  "
        f"noise gain {layout.noise_gain:.1f}{missed}"
    )


def cmd_plan(args: argparse.Namespace) -> int:
    from . import planning

    at = parse_values(args.at, "--at") if args.at is not None else None
    if at is not None and not all(0 < t <= args.steps for t in at):
        raise CommandError(f"--at: times must be in (0, --steps={args.steps}], got {args.at!r}")
    result = planning.plan(args.steps, sigma_rel=args.sigma_rel, max_fit_error=args.max_fit_error, at=at)
    if args.json:
        from dataclasses import asdict

        print(json.dumps(asdict(result), indent=2))
        return 0
    lo, hi = result.sigma_rel
    when = ",".join(f"{t:g}" for t in result.at)
    print(
        f"every sigma_rel in {lo:g}…{hi:g} within relative profile error {result.max_fit_error:g} at t={when} "
        f"(fp32 snapshots, also saved at the end and at each --at time):"
    )
    print(_layout_line("plan", result.best))
    print(_layout_line("EDM2", result.edm2))
    print(
        "compact snapshots (save_snapshot(dir, encoding='compact')) take under half these bytes for about the "
        "same reconstruction error; fp16 ones half, with far more error (docs/posthoc.md)"
    )
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from . import planning

    directory = _directory(args.directory, _SNAPSHOT_DIR)
    report = planning.prune(directory, sigma_rel=args.sigma_rel, max_fit_error=args.max_fit_error, dry_run=args.dry_run)
    if report.resumed:
        print(f"finished an interrupted prune: removed {len(report.resumed)} files listed in {planning.JOURNAL}")
    verb = "would remove" if report.dry_run else "removed"
    print(
        f"{directory}: {verb} {len(report.removed)} of {len(report.removed) + len(report.kept)} snapshots, "
        f"{report.bytes_before / 2**20:.1f} MiB -> {report.bytes_after / 2**20:.1f} MiB; worst fit error "
        f"{report.fit_error_before:.2e} -> {report.fit_error_after:.2e} (sigma_rel {args.sigma_rel[0]:g}…"
        f"{args.sigma_rel[1]:g}, max {args.max_fit_error:g})"
    )
    if report.rewritten:
        verb = "would rewrite" if report.dry_run else "rewrote"
        print(f"  {verb} {len(report.rewritten)} compact deltas as keyframes (their reference is removed)")
    if args.verbose:
        for name in report.removed:
            print(f"  {'-' if not report.dry_run else '?'} {name}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    import torch

    from . import posthoc

    evaluate = _load_callable(args.eval, "--eval")
    factory = _load_callable(args.model, "--model")
    grid = parse_values(args.sigma_rel, "--sigma-rel") if args.sigma_rel is not None else list(posthoc.DEFAULT_SWEEP)
    directory = _directory(args.directory, _SNAPSHOT_DIR)
    out = _output_directory(args.out)
    snaps = posthoc.list_snapshots(directory)
    _refuse_untrusted([info.path for info in snaps if info.pickled], args.trust)
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise CommandError(f"--model: {args.model}() returned a {type(model).__name__}, expected a torch.nn.Module")
    try:
        import matplotlib  # noqa: F401

        plot = True
    except ImportError:
        plot = False
    result = posthoc.sweep(
        snaps, evaluate, model=model, sigma_rel=grid, t=args.t, metric=args.metric,
        lower_is_better=not args.higher_is_better, search=args.search, out=out, plot=plot,
        **_trust(posthoc.reconstruct, args.trust),
    )  # fmt: skip
    print(result.to_markdown(), end="")
    print(f"report: {out / 'report.md'}" + ("" if plot else " (no sweep.png: pip install matplotlib)"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="emakit", description="Averaged model weights for PyTorch training.")
    parser.add_argument("--version", action="version", version=f"emakit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    trust_help = (
        "read DCP sharded snapshots (phema-*.dcp, written by emakit 0.1): their .metadata is a pickle, which can run code; "
        "pass it only for folders you wrote"
    )
    values_help = f"; at most {MAX_VALUES} values in all"

    p = sub.add_parser("inspect", help="list the snapshots of a power-EMA directory and what they support")
    p.add_argument("directory", help=_SNAPSHOT_DIR)
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("-v", "--verbose", action="store_true", help="list every snapshot file")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("reconstruct", help="rebuild EMAs of chosen lengths from power-EMA snapshots")
    p.add_argument("directory", help=_SNAPSHOT_DIR)
    p.add_argument("--sigma-rel", help="power-EMA lengths: 0.05,0.1 or a range 0.02:0.2:0.01" + values_help)
    p.add_argument("--decay", help="classic EMAs by per-step decay (fitted; see the fit error)" + values_help)
    p.add_argument("--halflife", help="classic EMAs by half-life, in the snapshots' time unit (fitted)" + values_help)
    p.add_argument(
        "--t", type=_positive_time, default=None, help="reconstruct at this time (default: the last snapshot)"
    )
    p.add_argument("--out", required=True, help="output directory: one ema-<length>.safetensors per length")
    p.add_argument(
        "--dtype", type=_dtype, default="model", help="'model' (default: the model's dtypes), float32, float16, ..."
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--trust", action="store_true", help=trust_help)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_reconstruct)

    p = sub.add_parser("sweep", help="score EMA lengths rebuilt from snapshots with your own evaluation; find the best")
    p.add_argument("directory", help=_SNAPSHOT_DIR)
    p.add_argument("--eval", required=True, help="pkg.module:function, called as function(model) -> float or dict")
    p.add_argument("--model", required=True, help="pkg.module:factory, called with no arguments -> the torch.nn.Module")
    p.add_argument(
        "--sigma-rel",
        help="lengths to evaluate: 0.05,0.1 or 0.02:0.2:0.01 (default: 12 from 0.01 to 0.25)" + values_help,
    )
    p.add_argument("--search", action="store_true", help="golden-section search: about half the evaluations")
    p.add_argument("--metric", default=None, help="which of evaluate's results ranks the lengths (default: the first)")
    p.add_argument("--higher-is-better", action="store_true", help="the metric is better when higher")
    p.add_argument("--t", type=_positive_time, default=None, help="sweep at this time (default: the last snapshot)")
    p.add_argument("--out", required=True, help="output directory: report.json, report.md, sweep.png")
    p.add_argument("--trust", action="store_true", help=trust_help)
    p.set_defaults(run=cmd_sweep)

    p = sub.add_parser("export", help="write sharded snapshots as single safetensors files, for storage")
    p.add_argument("path", help="a phema-*.shards or phema-*.dcp snapshot, or a directory of them")
    p.add_argument("--out", required=True, help="directory for the phema-*.safetensors files")
    p.add_argument("--trust", action="store_true", help=trust_help + " (exporting those needs it)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser(
        "verify",
        help="check snapshots and checkpoints without a model: readable, complete, finite",
        description=(
            "Check snapshot directories, snapshot files and emakit checkpoints (EMA.state_dict() saved with "
            "torch.save; EMA.save directories with --trust). Prints one line per problem and a summary; "
            "exit status 0: all good, 1: problems found, 2: bad arguments."
        ),
    )
    p.add_argument(
        "paths", nargs="+", metavar="PATH", help="snapshot directories or files, checkpoint files or directories"
    )
    p.add_argument(
        "--trust",
        action="store_true",
        help="read DCP folders (sharded snapshots, EMA.save checkpoints): "
        "their .metadata is a pickle, which can run code; pass it only for folders you wrote",
    )
    p.set_defaults(run=cmd_verify)

    p = sub.add_parser(
        "plan", help="choose tracked profiles and a snapshot interval: the fewest bytes that meet a fit target"
    )
    p.add_argument("--steps", type=_positive_int, required=True, help="length of the run (time of the last snapshot)")
    p.add_argument("--sigma-rel", type=_sigma_range, default=(0.03, 0.2), help="lengths to support, LOW:HIGH")
    p.add_argument(
        "--max-fit-error", type=_fit_error, default=1e-3, help="largest relative profile error allowed (1e-3)"
    )
    p.add_argument("--at", default=None, help="times to reconstruct at: 50000,100000 (default: --steps)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(run=cmd_plan)

    p = sub.add_parser("prune", help="delete the snapshots no length in a range needs (atomic, restartable)")
    p.add_argument("directory", help="a directory of single-file snapshots (phema-*.safetensors)")
    p.add_argument("--sigma-rel", type=_sigma_range, required=True, help="lengths to keep supporting, LOW:HIGH")
    p.add_argument(
        "--max-fit-error", type=_fit_error, default=1e-3, help="largest relative profile error allowed (1e-3)"
    )
    p.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    p.add_argument("-v", "--verbose", action="store_true", help="list the files removed")
    p.set_defaults(run=cmd_prune)

    p = sub.add_parser("demo", help="train a small diffusion model, sweep EMA lengths post hoc, write a report")
    p.add_argument("--out", default=None, help="output directory (default: runs/demo, or runs/demo-2, ... if taken)")
    p.add_argument("--quick", action="store_true", help="about a minute instead of a few")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe config overrides, e.g. steps=4000")
    p.set_defaults(run=cmd_demo)
    return parser


class _DropDcpLogs(logging.Filter):
    """DCP logs read failures with their tracebacks on the root logger; the CLI reports them itself, on one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "torch/distributed/checkpoint" not in record.pathname.replace(os.sep, "/")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (arguments, files): one line, exit status 2."""
    from ._files import dcp as _dcp
    from .snapshots import SnapshotError

    errors: tuple[type[BaseException], ...] = (CommandError, SnapshotError, ValueError, ImportError, OSError)
    errors += (getattr(_dcp, "CheckpointError", CommandError),)
    if "torch.distributed.checkpoint" in sys.modules:  # its CheckpointException is a BaseException
        from torch.distributed.checkpoint.api import CheckpointException

        errors += (CheckpointException,)
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        print(e, file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help()
        return 0
    quiet = _DropDcpLogs()
    logging.getLogger().addFilter(quiet)
    try:
        return args.run(args)
    except BaseException as e:
        if not isinstance(e, _user_errors()):
            raise
        print(f"emakit {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    finally:
        logging.getLogger().removeFilter(quiet)


if __name__ == "__main__":
    sys.exit(main())
