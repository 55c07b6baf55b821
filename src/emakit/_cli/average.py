"""``emakit average``: ordinary checkpoints averaged (a uniform mean, or the EMA of a length rebuilt from them),
and ``emakit sweep`` on a folder of ordinary checkpoints."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .args import CommandError, _dtype, _positive_int, _positive_time, _write_failure


def _step_range(text: str) -> tuple[float, float]:
    parts = text.split(":")
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        lo = hi = math.nan
    if len(parts) != 2 or not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi):
        raise argparse.ArgumentTypeError(f"expected FIRST:LAST steps with 0 <= FIRST <= LAST, got {text!r}")
    return lo, hi


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def add_average(sub) -> None:
    p = sub.add_parser(
        "average",
        help="average ordinary checkpoints: the mean of the last N, or the EMA of any length rebuilt from them",
        description=(
            "Average ordinary training checkpoints (torch.save / safetensors files, save_pretrained and Trainer "
            "checkpoint-* folders, Lightning .ckpt, DCP folders with --trust), one in memory at a time. Without "
            "--last/--steps/--sigma-rel/--decay/--halflife: the mean of all of them. Each checkpoint's step comes "
            "from the file (--step-key, Lightning's global_step, trainer_state.json) or its name (ckpt_1500.pt)."
        ),
    )
    p.add_argument("checkpoints", nargs="+", help="checkpoint files or folders, a directory of them, or a glob")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--last", type=_positive_int, help="the uniform mean of the newest N checkpoints")
    what.add_argument("--steps", type=_step_range, help="the uniform mean of the checkpoints with FIRST <= step <= LAST")
    what.add_argument("--sigma-rel", type=_positive_time, help="the power EMA (EDM2) of this relative width, rebuilt")
    what.add_argument("--decay", type=_unit_interval, help="the classic EMA of this decay per step, rebuilt")
    what.add_argument("--halflife", type=_positive_time, help="the classic EMA of this half-life in steps, rebuilt")
    p.add_argument("--t", type=_positive_time, default=None, help="the EMA at this checkpoint's step (default: newest)")
    p.add_argument("--key", default=None, help="where the weights are in each file (e.g. ema, or model.state_dict)")
    p.add_argument("--step-key", default=None, help="where the step count is in each file (e.g. global_step)")
    p.add_argument("--dtype", type=_dtype, default="model", help="output dtype (default: each tensor's own)")
    p.add_argument(
        "--out", default=None, help="output file: .safetensors, or any other name for torch.save (nothing written without it)"
    )
    p.add_argument("--trust", action="store_true", help="unpickle files that hold more than tensors (only yours)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    p.set_defaults(run=cmd_average)


def cmd_average(args: argparse.Namespace) -> int:
    import torch

    from .. import posthoc

    out = Path(args.out) if args.out is not None else None
    if out is not None and (out.is_dir() or not out.parent.is_dir()):
        raise CommandError(f"--out {out}: expected a file name in an existing directory")
    source = args.checkpoints[0] if len(args.checkpoints) == 1 else args.checkpoints
    averaged = posthoc.average_checkpoints(
        source, last=args.last, steps=args.steps, sigma_rel=args.sigma_rel, decay=args.decay,
        halflife=args.halflife, t=args.t, key=args.key, step_key=args.step_key, trust=args.trust,
        dtype=None if args.dtype == "model" else getattr(torch, args.dtype), progress=not args.quiet,
    )  # fmt: skip
    if not args.quiet:
        print(averaged.summary())
        for path, t, weight in averaged.used:
            print(f"  t={t:<12g} weight {weight:.4g}  {path}")
    if out is None:
        if not args.quiet:
            print("nothing written (pass --out FILE)")
        return 0
    try:
        posthoc.save_average(averaged, out, key=args.key, trust=args.trust)
    except (OSError, RuntimeError) as e:
        raise _write_failure(out, e) from None
    if not args.quiet:
        print(f"wrote {out}")
    return 0


def sweep_checkpoints(args: argparse.Namespace, directory: Path, evaluate, model, grid, out: Path, plot: bool):
    """``emakit sweep`` on a folder that holds ordinary checkpoints instead of snapshots."""
    from .. import posthoc

    if args.t is not None:
        raise CommandError("--t: a sweep over ordinary checkpoints is at the newest one; leave --t out")
    return posthoc.sweep_checkpoints(
        directory, evaluate, model=model, sigma_rel=grid, metric=args.metric,
        lower_is_better=not args.higher_is_better, search=args.search, out=out, plot=plot,
        key=args.key, step_key=args.step_key, trust=args.trust,
    )  # fmt: skip
