"""Reading the command line: values, ranges, paths and trust, each bad one a one-line error.

Owns what ``emakit``'s commands (:mod:`emakit.cli`) check before they do anything: numbers
and ranges (``--sigma-rel``), argparse types, input and output paths, ``pkg.module:function``
callables, the refusal to read pickled DCP folders without ``--trust``, and how a failed
write is reported. Every rejection is a :class:`CommandError` (or argparse's error, turned
into one line): printed without a traceback, exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import inspect
import math
import os
import re
import sys
from pathlib import Path

#: The most values one option (``--sigma-rel`` etc.) may list or a range expand to.
MAX_VALUES = 1000


class CommandError(Exception):
    """A user error: printed on one line without a traceback, exit status 2."""


class _UsageError(Exception):
    """A command line argparse rejects: printed on one line (no usage block), exit status 2."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(f"{prog}: error: {message} (see {prog} --help)")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints the usage block and exits; we want one line
        raise _UsageError(self.prog, message)


def parse_values(text: str, option: str = "values") -> list[float]:
    """``"0.03,0.05"`` or ``"0.02:0.2:0.01"`` (inclusive range) or a mix, to a sorted list of finite floats.

    At most :data:`MAX_VALUES` values in all; ``option`` names the option in errors.

    >>> parse_values("0.1,0.02:0.04:0.01")
    [0.02, 0.03, 0.04, 0.1]
    """
    expected = "expected numbers like 0.05 or ranges start:stop:step (start <= stop, step > 0)"
    values: set[float] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            numbers = [float(x) for x in part.split(":")]
        except ValueError:
            raise CommandError(f"{option}: cannot read {part!r}: {expected}") from None
        if not all(math.isfinite(x) for x in numbers):
            raise CommandError(f"{option}: {part!r} is not finite: {expected}")
        if len(numbers) == 1:
            values.add(numbers[0])
        elif len(numbers) == 3 and numbers[2] > 0 and numbers[0] <= numbers[1]:
            start, stop, step = numbers
            count = math.floor((stop - start) / step + 1e-9) + 1 if math.isfinite((stop - start) / step) else math.inf
            if count > MAX_VALUES:
                amount = f"{count:,.0f}" if math.isfinite(count) else "infinitely many"
                raise CommandError(
                    f"{option}: range {part!r} expands to {amount} values; at most {MAX_VALUES} are allowed "
                    f"(take a larger step)"
                )
            values.update(round(start + i * step, 10) for i in range(int(count)))
        else:
            raise CommandError(f"{option}: cannot read {part!r}: {expected}")
        if len(values) > MAX_VALUES:
            raise CommandError(f"{option}: more than {MAX_VALUES} values in {text!r}; at most {MAX_VALUES} are allowed")
    if not values:
        raise CommandError(f"{option}: no values in {text!r}: {expected}")
    return sorted(values)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {text!r}")
    return value


def _positive_time(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _dtype(text: str) -> str:
    import torch

    if text != "model" and not (
        isinstance(getattr(torch, text, None), torch.dtype) and getattr(torch, text).is_floating_point
    ):
        raise argparse.ArgumentTypeError(
            f"expected 'model' or a floating dtype (float32, bfloat16, float16, float64), got {text!r}"
        )
    return text


def _directory(path: str | os.PathLike, what: str) -> Path:
    """``path`` if it is a directory this process can list, else a one-line error saying what was expected."""
    path = Path(path)
    if not path.exists():
        raise CommandError(f"{path}: no such directory; expected {what}")
    if not path.is_dir():
        raise CommandError(f"{path}: is a file; expected {what}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise CommandError(f"{path}: permission denied; cannot list {what}")
    return path


def _output_directory(path: str | os.PathLike) -> Path:
    """``--out``: a directory (created when missing), not a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CommandError(f"--out {path}: is a file; expected a directory (created if missing)")
    return path


def untrusted_message(path: Path, kind: str = "sharded (DCP) snapshot") -> str:
    return f"{path} is a {kind} whose .metadata is a pickle: reading it can run code; pass --trust if you wrote it"


def _refuse_untrusted(sharded: list[Path], trust: bool) -> None:
    """Refuse, before anything is read, to read DCP folders the user did not vouch for."""
    if sharded and not trust:
        raise CommandError(untrusted_message(sharded[0]))


def _trust(function, trust: bool) -> dict:
    """``{"trust": trust}`` when ``function`` takes it (emakit versions before it read DCP folders unasked)."""
    return {"trust": trust} if "trust" in inspect.signature(function).parameters else {}


def _write_failure(path: Path, error: BaseException) -> CommandError:
    """One line for a failed write: which file, and why (full disk, file-size limit, ...)."""
    code = getattr(error, "errno", None)
    if code is None:  # safetensors reports the OS error in its message: "... (os error 28)"
        found = re.search(r"os error (\d+)", str(error))
        code = int(found.group(1)) if found else None
    if code == errno.ENOSPC:
        return CommandError(f"no space left on device while writing {path}")
    if code == errno.EFBIG:
        return CommandError(f"file too large while writing {path} (the file-size limit, ulimit -f, was reached)")
    if code == errno.EDQUOT:
        return CommandError(f"disk quota exceeded while writing {path}")
    return CommandError(f"could not write {path}: {_one_line(error)}")


def _one_line(error: BaseException) -> str:
    """An exception as one line: the first line of its message (DCP's messages hold whole tracebacks)."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _sigma_range(text: str) -> tuple[float, float]:
    """``--sigma-rel LOW:HIGH`` (a range of lengths, not a list) for plan and prune."""
    parts = text.split(":")
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a range LOW:HIGH such as 0.03:0.2, got {text!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
        raise argparse.ArgumentTypeError(f"expected a range LOW:HIGH with 0 < LOW <= HIGH, got {text!r}")
    return lo, hi


def _fit_error(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a relative profile error > 0 such as 1e-3, got {text!r}")
    return value


def _load_callable(spec: str, option: str):
    """The object ``pkg.module:name`` names (the current directory is importable), or a one-line error."""
    import importlib

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CommandError(f"{option}: expected pkg.module:function, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise CommandError(f"{option}: cannot import {module_name!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CommandError(f"{option}: {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CommandError(f"{option}: {spec} is a {type(obj).__name__}, not a function")
    return obj
