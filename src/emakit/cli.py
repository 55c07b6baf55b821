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
emakit average run/checkpoints --last 5 --out run/mean.safetensors   # ordinary checkpoints
emakit average run/checkpoints --sigma-rel 0.05 --out run/ema.pt     # the EMA rebuilt from them

Every bad argument or unreadable input is one line on stderr and exit status 2 (``verify``:
1 when it found problems). Sharded snapshots written by emakit 0.1 (``phema-*.dcp``) hold a
pickled DCP ``.metadata``: the commands that read them need ``--trust``. Today's sharded
snapshots (``phema-*.shards``) are safetensors and JSON, read without it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__
from ._cli.args import (  # parse_values and _trust: re-exported, emakit.cli's names as before
    MAX_VALUES,
    CommandError,
    _dtype,
    _fit_error,
    _one_line,
    _Parser,
    _positive_int,
    _positive_time,
    _seed,
    _sigma_range,
    _trust,  # noqa: F401
    _UsageError,
    parse_values,  # noqa: F401
)
from ._cli.average import add_average
from ._cli.commands import (
    _SNAPSHOT_DIR,
    cmd_demo,
    cmd_export,
    cmd_inspect,
    cmd_plan,
    cmd_prune,
    cmd_reconstruct,
    cmd_sweep,
    cmd_verify,
)

_TRUST_HELP = (
    "read DCP sharded snapshots (phema-*.dcp, written by emakit 0.1): their .metadata is a pickle, which can run code; "
    "pass it only for folders you wrote"
)
_VALUES_HELP = f"; at most {MAX_VALUES} values in all"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="emakit", description="Averaged model weights for PyTorch training.")
    parser.add_argument("--version", action="version", version=f"emakit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_inspect, _add_reconstruct, add_average, _add_sweep, _add_export, _add_verify, _add_plan, _add_prune, _add_demo):
        add(sub)
    return parser


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="list the snapshots of a power-EMA directory and what they support")
    p.add_argument("directory", help=_SNAPSHOT_DIR)
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("-v", "--verbose", action="store_true", help="list every snapshot file")
    p.set_defaults(run=cmd_inspect)


def _add_reconstruct(sub) -> None:
    p = sub.add_parser("reconstruct", help="rebuild EMAs of chosen lengths from power-EMA snapshots")
    p.add_argument("directory", help=_SNAPSHOT_DIR)
    p.add_argument("--sigma-rel", help="power-EMA lengths: 0.05,0.1 or a range 0.02:0.2:0.01" + _VALUES_HELP)
    p.add_argument("--decay", help="classic EMAs by per-step decay (fitted; see the fit error)" + _VALUES_HELP)
    p.add_argument("--halflife", help="classic EMAs by half-life, in the snapshots' time unit (fitted)" + _VALUES_HELP)
    p.add_argument(
        "--t", type=_positive_time, default=None, help="reconstruct at this time (default: the last snapshot)"
    )
    p.add_argument("--out", required=True, help="output directory: one ema-<length>.safetensors per length")
    p.add_argument(
        "--dtype", type=_dtype, default="model", help="'model' (default: the model's dtypes), float32, float16, ..."
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--trust", action="store_true", help=_TRUST_HELP)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_reconstruct)


def _add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep", help="score EMA lengths rebuilt from snapshots (or ordinary checkpoints) with your own evaluation"
    )
    p.add_argument("directory", help=_SNAPSHOT_DIR + ", or a directory of ordinary checkpoints")
    p.add_argument("--eval", required=True, help="pkg.module:function, called as function(model) -> float or dict")
    p.add_argument("--model", required=True, help="pkg.module:factory, called with no arguments -> the torch.nn.Module")
    p.add_argument(
        "--sigma-rel",
        help="lengths to evaluate: 0.05,0.1 or 0.02:0.2:0.01 (default: 12 from 0.01 to 0.25)" + _VALUES_HELP,
    )
    p.add_argument("--search", action="store_true", help="golden-section search: about half the evaluations")
    p.add_argument("--metric", default=None, help="which of evaluate's results ranks the lengths (default: the first)")
    p.add_argument("--higher-is-better", action="store_true", help="the metric is better when higher")
    p.add_argument("--t", type=_positive_time, default=None, help="sweep at this time (default: the last snapshot)")
    p.add_argument("--out", required=True, help="output directory: report.json, report.md, sweep.png")
    p.add_argument("--key", default=None, help="ordinary checkpoints: where the weights are in each file")
    p.add_argument("--step-key", default=None, help="ordinary checkpoints: where the step count is in each file")
    p.add_argument("--trust", action="store_true", help=_TRUST_HELP)
    p.set_defaults(run=cmd_sweep)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write sharded snapshots as single safetensors files, for storage")
    p.add_argument("path", help="a phema-*.shards or phema-*.dcp snapshot, or a directory of them")
    p.add_argument("--out", required=True, help="directory for the phema-*.safetensors files")
    p.add_argument("--trust", action="store_true", help=_TRUST_HELP + " (exporting those needs it)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    p.set_defaults(run=cmd_export)


def _add_verify(sub) -> None:
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


def _add_plan(sub) -> None:
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


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="delete the snapshots no length in a range needs (atomic, restartable)")
    p.add_argument("directory", help="a directory of single-file snapshots (phema-*.safetensors)")
    p.add_argument("--sigma-rel", type=_sigma_range, required=True, help="lengths to keep supporting, LOW:HIGH")
    p.add_argument(
        "--max-fit-error", type=_fit_error, default=1e-3, help="largest relative profile error allowed (1e-3)"
    )
    p.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    p.add_argument("-v", "--verbose", action="store_true", help="list the files removed")
    p.set_defaults(run=cmd_prune)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train a small diffusion model, sweep EMA lengths post hoc, write a report")
    p.add_argument("--out", default=None, help="output directory (default: runs/demo, or runs/demo-2, ... if taken)")
    p.add_argument("--quick", action="store_true", help="about a minute instead of a few")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: OMP_NUM_THREADS, else half the usable CPUs)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe config overrides, e.g. steps=4000")
    p.set_defaults(run=cmd_demo)


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
