"""Checksums of stored bytes: CRC-32 (zlib's) or CRC-32C, whichever runs faster here.

Owns the two algorithms a file of emakit may name (``"crc32"``: zlib's CRC-32, what files
that name no algorithm hold; ``"crc32c"``: the Castagnoli CRC) and which one a new file gets
(:func:`preferred`), by the compiled implementations installed (``pip install
'emakit[fast]'``), measured per thread here (``benchmarks/bench_power.py``):

- CRC-32 of ISA-L (the isal package) or zlib-ng (the zlib-ng package): 55-58 GB/s, with
  carry-less multiply instructions. New files get CRC-32 then, which every emakit release
  reads and which zlib (always there) verifies where neither package is installed.
- CRC-32C of the crc32c package (or google-crc32c): 17-28 GB/s. New files get CRC-32C
  where it is installed and no fast CRC-32 is (what emakit wrote before it used ISA-L).
- zlib's CRC-32 alone: 2-4 GB/s. New files get CRC-32.

A file that names CRC-32C is verified also without a package, by a slower vectorised torch
implementation. All of them but google-crc32c release the GIL on large buffers, so readers
run them on threads beside their reads. Imports no other emakit module.

    digest = hex_digest(tensor, "crc32")           # 8 hex digits
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import importlib
import os
import zlib

import torch
from torch import Tensor

ALGORITHMS = ("crc32", "crc32c")
#: The algorithm of files that do not name one (everything written before CRC-32C).
LEGACY = "crc32"


#: Modules with a zlib-compatible ``crc32(data, value)`` faster than zlib's, the first one installed used.
_FAST_CRC32 = ("isal.isal_zlib", "zlib_ng.zlib_ng")


@functools.lru_cache(maxsize=1)
def _fast_crc32():
    """``crc32(data, value) -> crc`` of ISA-L or zlib-ng (zlib's CRC-32, about 15x faster here), or None when
    neither is installed. Both release the GIL on large buffers."""
    for name in _FAST_CRC32:
        try:
            return importlib.import_module(name).crc32
        except ImportError:
            continue
    return None


@functools.lru_cache(maxsize=1)
def _fast_crc32c():
    """``extend(crc, buffer) -> crc`` of a compiled CRC-32C, or None when no such package is installed.

    The crc32c package releases the GIL while it runs; google-crc32c holds it, so it gets
    1 MiB at a time (other threads run in between).
    """
    try:
        import crc32c

        return lambda crc, data: crc32c.crc32c(data, crc)
    except ImportError:
        pass
    try:
        import google_crc32c
    except ImportError:
        return None
    if google_crc32c.implementation != "c":
        return None

    def extend(crc: int, data) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), 1 << 20):
            crc = google_crc32c.extend(crc, view[start : start + (1 << 20)].tobytes())
        return crc

    return extend


def preferred() -> str:
    """The algorithm new files get: ``"crc32"`` where ISA-L or zlib-ng computes it, else ``"crc32c"`` where a
    compiled CRC-32C is installed, else ``"crc32"`` (zlib's)."""
    return "crc32c" if _fast_crc32() is None and _fast_crc32c() is not None else "crc32"


def check_algorithm(name: object, where: str) -> str:
    """``name`` if it is one of :data:`ALGORITHMS`, else ``ValueError`` naming ``where``."""
    if name not in ALGORITHMS:
        raise ValueError(f"{where}: unknown checksum algorithm {name!r}; expected one of {ALGORITHMS}")
    return str(name)


def buffer_of(tensor: Tensor):
    """The bytes of a CPU tensor in place (no copy), for anything that takes a buffer; contiguous tensors only.

    A numpy view where numpy is installed (it keeps the tensor alive), else a ctypes array (a new ctypes
    type for every length: about 12 us more per call, which a compact snapshot of many tensors pays for
    each).
    """
    flat = tensor.detach().reshape(-1).view(torch.uint8)
    if not flat.numel():
        return b""
    if _numpy():
        return flat.numpy()
    return (ctypes.c_char * flat.numel()).from_address(flat.data_ptr())


@functools.lru_cache(maxsize=1)
def _numpy() -> bool:
    """Whether torch can hand out numpy views here (numpy is no dependency of emakit or torch)."""
    try:
        torch.zeros(1).numpy()
    except (ImportError, RuntimeError):
        return False
    return True


def extend(crc: int, data, algorithm: str) -> int:
    """The checksum of ``previous bytes + data`` given ``crc``, that of the previous bytes (0 for none)."""
    if algorithm == "crc32":
        return (_fast_crc32() or zlib.crc32)(data, crc)
    fast = _fast_crc32c()
    if fast is not None:
        return fast(crc, data)
    return _crc32c_torch(crc, torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else None)


def hex_digest(tensor: Tensor, algorithm: str) -> str:
    """The checksum of a tensor's bytes, as 8 hex digits (what headers, indexes and checksum files store)."""
    flat = tensor.detach().contiguous().cpu() if tensor.numel() else torch.empty(0, dtype=torch.uint8)
    if algorithm == "crc32c" and _fast_crc32c() is None:
        value = _crc32c_torch(0, flat.reshape(-1).view(torch.uint8) if flat.numel() else None)
    else:
        value = extend(0, buffer_of(flat), algorithm)
    return f"{value:08x}"


@functools.lru_cache(maxsize=1)
def pool() -> concurrent.futures.ThreadPoolExecutor:
    workers = max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))
    return concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="emakit-checksum")


def single_threaded(fn, *args):
    """``fn(*args)`` with one torch intra-op thread, for work on :func:`pool`'s threads: the threads are the
    parallelism (two of them on two cores would otherwise run four). Only this thread's OpenMP setting changes, and
    only meanwhile."""
    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        if threads != 1:
            torch.set_num_threads(threads)


def submit(tensor: Tensor, algorithm: str) -> concurrent.futures.Future:
    """:func:`hex_digest` of ``tensor`` on a checksum thread (touching its bytes there: a mapped file is read)."""
    return pool().submit(hex_digest, tensor, algorithm)


# --------------------------------------------------------------------------- CRC-32C without a package

_POLY = 0x82F63B78  # CRC-32C, reflected


@functools.lru_cache(maxsize=1)
def _table() -> Tensor:
    table = []
    for n in range(256):
        for _ in range(8):
            n = (n >> 1) ^ (_POLY if n & 1 else 0)
        table.append(n)
    return torch.tensor(table, dtype=torch.int64)


def _apply(columns: Tensor, values: Tensor) -> Tensor:
    """The GF(2)-linear map whose image of bit ``j`` is ``columns[j]``, applied to each of ``values``."""
    out = torch.zeros_like(values)
    for j in range(32):
        out ^= columns[j] * ((values >> j) & 1)
    return out


def _zeros_map(length: int) -> Tensor:
    """Columns of the map that feeds ``length`` zero bytes through the CRC register."""
    step = _table()[torch.tensor([1 << j for j in range(32)]) & 0xFF] ^ (torch.tensor([1 << j for j in range(32)]) >> 8)
    result = torch.tensor([1 << j for j in range(32)], dtype=torch.int64)  # identity
    while length:
        if length & 1:
            result = _apply(step, result)
        step = _apply(step, step)
        length >>= 1
    return result


def _crc32c_torch(crc: int, data: Tensor | None) -> int:
    """CRC-32C of ``data`` (uint8, 1-D) extending ``crc``, in torch: lanes of bytes side by side, then combined.

    The register is linear over GF(2): the bytes are cut into ``lanes`` rows of ``m`` bytes, all
    rows run through the table at once (``m`` steps), and the rows' registers are folded
    pairwise with the map of ``m * 2**k`` zero bytes. About 15-20 MB/s here (16 MiB pieces at a
    time): only for reading a CRC-32C file where no compiled implementation is installed.
    """
    if data is None or data.numel() == 0:
        return crc
    piece = 16 << 20
    for start in range(0, data.numel(), piece):
        crc = _crc32c_piece(crc, data[start : start + piece])
    return crc


def _crc32c_piece(crc: int, data: Tensor) -> int:
    table, n = _table(), data.numel()
    lanes = 1 << max(0, min(16, (n // 256).bit_length() - 1))
    m = n // lanes
    reg = torch.zeros(lanes, dtype=torch.int64)
    body = data[: lanes * m].view(lanes, m).t().contiguous()
    for k in range(m):
        reg = table[(reg ^ body[k]) & 0xFF] ^ (reg >> 8)
    span = m
    while reg.numel() > 1:
        reg = _apply(_zeros_map(span), reg[0::2]) ^ reg[1::2]
        span *= 2
    register = int(_apply(_zeros_map(span), torch.tensor([crc ^ 0xFFFFFFFF]))[0]) ^ int(reg[0])
    for byte in data[lanes * m :].tolist():
        register = int(table[(register ^ byte) & 0xFF]) ^ (register >> 8)
    return register ^ 0xFFFFFFFF
