"""The ``emakit`` commands: what each subcommand of :mod:`emakit.cli` does once its arguments parse.

Owns ``inspect``, ``reconstruct``, ``export``, ``verify``, ``plan``, ``prune``, ``sweep`` and
``demo`` (each ``cmd_<name>(args) -> exit status``) and the lines they print. The parser and
``main`` (one-line errors, exit status 2) stay in :mod:`emakit.cli`; checking the values and
paths is :mod:`emakit._cli.args`'s. The library modules are imported inside each command, so
``emakit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from .._files.atomic import write_then_rename
from .args import (
    MAX_VALUES,
    CommandError,
    _directory,
    _load_callable,
    _output_directory,
    _refuse_untrusted,
    _trust,
    _write_failure,
    parse_values,
    untrusted_message,
)

_SNAPSHOT_DIR = "a directory of snapshots (phema-*.safetensors files or phema-*.shards / .dcp directories)"


def _label(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".") if value >= 1e-4 else f"{value:.3g}"


def cmd_inspect(args: argparse.Namespace) -> int:
    from .. import posthoc

    snaps = posthoc.list_snapshots(_directory(args.directory, _SNAPSHOT_DIR))  # headers only: no trust needed
    first = snaps[0]
    numel = sum(math.prod(first.shapes[n]) for n in first.averaged)
    reliable = posthoc.reliable_range(snaps)
    summary = _inspect_summary(args.directory, snaps, numel, reliable)
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


def _inspect_summary(directory, snaps, numel: int, reliable) -> dict:
    """What ``inspect --json`` prints: the directory's snapshots, profiles, sizes and reliable range."""
    first = snaps[0]
    return {
        "directory": str(directory),
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


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from .. import posthoc
    from ..snapshots import _safetensors

    safetensors, _ = _safetensors()
    targets = _targets(args)
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
    writes = _ema_writes(paths, solutions, results, directory, safetensors)
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


def _targets(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """``(file label, solve_coefficients keywords)`` of every EMA length requested, at most MAX_VALUES."""
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
    return targets


def _ema_writes(paths, solutions, results, directory: Path, safetensors) -> list:
    """``write_then_rename``'s list: each reconstruction as a safetensors file with its solve in the metadata."""
    import torch

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
    return writes


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

    from . import demo

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
    torch.set_num_threads(args.threads or demo.diffusion.cpu_threads())  # not torch's all-CPUs default
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
    from .. import snapshots
    from ..snapshots import SnapshotError

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
    from .. import verify

    for path in args.paths:
        path = Path(path)
        if not path.exists():
            raise CommandError(
                f"{path}: no such file or directory; expected a snapshot, a snapshot directory or a checkpoint"
            )
        if not (path.is_dir() or path.is_file()):
            raise CommandError(f"{path}: not a regular file or directory (a FIFO, device or socket?)")
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
    from .. import planning

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
    from .. import planning

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

    from .. import posthoc, snapshots
    from .average import sweep_checkpoints

    evaluate = _load_callable(args.eval, "--eval")
    factory = _load_callable(args.model, "--model")
    grid = parse_values(args.sigma_rel, "--sigma-rel") if args.sigma_rel is not None else list(posthoc.DEFAULT_SWEEP)
    directory = _directory(args.directory, _SNAPSHOT_DIR)
    out = _output_directory(args.out)
    raw = not snapshots.snapshot_paths(directory)  # a folder of ordinary checkpoints
    snaps = [] if raw else posthoc.list_snapshots(directory)
    _refuse_untrusted([info.path for info in snaps if info.pickled], args.trust)
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise CommandError(f"--model: {args.model}() returned a {type(model).__name__}, expected a torch.nn.Module")
    try:
        import matplotlib  # noqa: F401

        plot = True
    except ImportError:
        plot = False
    result = sweep_checkpoints(args, directory, evaluate, model, grid, out, plot) if raw else posthoc.sweep(
        snaps, evaluate, model=model, sigma_rel=grid, t=args.t, metric=args.metric,
        lower_is_better=not args.higher_is_better, search=args.search, out=out, plot=plot,
        **_trust(posthoc.reconstruct, args.trust),
    )  # fmt: skip
    print(result.to_markdown(), end="")
    print(f"report: {out / 'report.md'}" + ("" if plot else " (no sweep.png: pip install matplotlib)"))
    return 0
