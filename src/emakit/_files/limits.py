"""Bounded reading of the small files emakit reads beside its tensors: regular files only, JSON capped.

Owns the limits on what a hostile or damaged file can make a reader do: every JSON file emakit
reads (a ``.shards`` / ``.dcp`` index ``emakit.json``, the prune journal, ``EMA.save``'s
checksum file) must be a regular file (a FIFO would block, ``/dev/zero`` never ends) of at
most :func:`json_bytes` bytes, and JSON nested deeper than Python's recursion limit is an
error, not a ``RecursionError``. The cap is 64 MiB, far above any real file (an index lists
each tensor's part per rank, about 100 bytes each), and can be raised with
:func:`emakit.snapshots.set_read_limits` or the ``EMAKIT_MAX_JSON_BYTES`` environment
variable. Errors are ``ValueError`` / ``OSError``, which each caller turns into its own error
naming the file.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

#: Default cap on a JSON file emakit reads (bytes).
MAX_JSON_BYTES = 64 << 20
_LIMITS: dict[str, int] = {}


def json_bytes() -> int:
    """The cap on a JSON file's size now: :func:`set_json_bytes`, else ``EMAKIT_MAX_JSON_BYTES``, else 64 MiB."""
    if "json_bytes" in _LIMITS:
        return _LIMITS["json_bytes"]
    env = os.environ.get("EMAKIT_MAX_JSON_BYTES", "")
    return int(env) if env.strip().isdigit() and int(env) > 0 else MAX_JSON_BYTES


def set_json_bytes(limit: int | None) -> None:
    """Set the cap (``None``: back to the environment variable or the default)."""
    if limit is None:
        _LIMITS.pop("json_bytes", None)
    elif isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise ValueError(f"set_read_limits: json_bytes must be an integer > 0, got json_bytes={limit!r}")
    else:
        _LIMITS["json_bytes"] = limit


def read_regular(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes; never blocks on a FIFO or device."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO opens at once, then fails below
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path} is not a regular file (a FIFO, device or socket?)")
        if info.st_size > limit:
            raise ValueError(
                f"{path} is {info.st_size} bytes, more than the {limit} allowed (a real one is far smaller; raise "
                f"the cap with emakit.snapshots.set_read_limits(json_bytes=...) or EMAKIT_MAX_JSON_BYTES)"
            )
        chunks, total = [], 0
        while total <= limit:  # (the file may grow after the fstat)
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise ValueError(f"{path} grew past the {limit} bytes allowed while being read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def loads(text: str | bytes) -> Any:
    """``json.loads``, with nesting too deep for Python's recursion limit a ``ValueError``."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply (a real file nests a few levels)") from None


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file: regular, at most :func:`json_bytes` bytes, not nested too deeply (``ValueError`` / ``OSError``)."""
    raw = read_regular(Path(path), json_bytes())
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text ({e})") from None
    return loads(text)
