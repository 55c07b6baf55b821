"""zstd and zlib streams for compact snapshots: compress, and inflate never past a bound (no decompression bomb).

zstd (level 1) where the ``zstandard`` package is installed (``emakit[fast]``), else zlib (level 6); inflating tells
them apart by their first bytes. Imports no other emakit module.
"""

from __future__ import annotations

import io
import threading
import zlib

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy comes with the safetensors / dev installs
    raise ImportError("compact snapshots need numpy: pip install numpy (or use encoding='fp32')") from None
import torch
from torch import Tensor

#: zlib level: 6 (zlib's default) is within 1% of 9 in size here at about a third of the time.
ZLIB_LEVEL = 6
#: zstd level: 1 beats zstd's default 3 on these streams, in bytes (0.754x against 0.771x of a predicted delta's
#: packed steps) and speed (about 6x faster to compress, 2x to inflate: 3 searches matches that noise lacks).
ZSTD_LEVEL = 1
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def zstd():
    """The ``zstandard`` module, or ``None`` where it is not installed (zlib then)."""
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


#: One single-threaded zstd compressor and decompressor per thread, made on first use: making one costs about
#: 10 us, more than compressing or inflating a small tensor (a model of thousands of tensors pays it for each).
_CODECS = threading.local()


def _zstd_codec(zstandard, compress: bool):
    """This thread's zstd compressor (``compress``) or decompressor (reusable, not shareable across threads)."""
    codec = _CODECS.__dict__.get(compress)
    if codec is None:
        codec = zstandard.ZstdCompressor(level=ZSTD_LEVEL) if compress else zstandard.ZstdDecompressor()
        _CODECS.__dict__[compress] = codec
    return codec


def compress(raw) -> Tensor:
    """``raw`` (bytes, or a contiguous uint8 array) compressed (zstd, else zlib), as a uint8 tensor."""
    zstandard = zstd()
    if zstandard is not None and len(raw) > 8 << 20:  # on 2 threads (their pool is not kept: forks would lose it)
        packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=2).compress(raw)
    elif zstandard is not None:
        packed = _zstd_codec(zstandard, compress=True).compress(raw)
    else:
        packed = zlib.compress(raw, ZLIB_LEVEL)
    return torch.frombuffer(bytearray(packed), dtype=torch.uint8)


def inflate(payload: Tensor | memoryview, limit: int):
    """A reader of the uncompressed bytes of ``payload`` that stops at ``limit`` (``.read(n)``, ``.end()``)."""
    return Inflated(payload if isinstance(payload, memoryview) else memoryview(payload.contiguous().numpy()), limit)


class Inflated:
    """Bounded reading of a zstd or zlib stream: never more than ``limit`` bytes come out of it.

    A zstd frame that states its size (emakit writes such frames) is inflated in one call once that size is
    checked against the limit, twice as fast as streaming it; other frames, and zlib, are streamed.
    """

    def __init__(self, data: bytes | memoryview, limit: int) -> None:
        self._left, self._zlib, self._whole, self._at = limit, None, None, 0
        if data[:4] != _ZSTD_MAGIC:
            self._zlib, self._data = zlib.decompressobj(), data
            return
        zstandard = zstd()
        if zstandard is None:
            raise ImportError("this compact snapshot is zstd-compressed: pip install zstandard (or 'emakit[fast]')")
        try:
            size = zstandard.frame_content_size(data)  # -1: not stated
            if size > limit:
                raise ValueError(f"the payload claims {size} bytes, more than the {limit} its shape allows")
            if size >= 0:
                self._whole = memoryview(_zstd_codec(zstandard, compress=False).decompress(data))
            else:
                self._stream = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=False)
        except zstandard.ZstdError as e:
            raise ValueError(f"the payload is not a valid compressed stream ({e})") from None

    def read(self, n: int) -> bytes | memoryview:
        """Exactly ``n`` bytes (a bytes-like object); ``ValueError`` if the stream ends first or ``n`` passes the limit."""
        if n > self._left:
            raise ValueError(f"the payload claims more than the {self._left + n} bytes its shape allows")
        self._left -= n
        out = self._pull(n)
        if len(out) != n:
            raise ValueError(f"decoded {len(out)} bytes, expected {n}")
        return out

    def read_into(self, out: np.ndarray) -> None:
        """Fill the contiguous uint8 array ``out`` (inflated into it when zstd streams); errors as :meth:`read`."""
        n = out.size
        if self._whole is not None or self._zlib is not None or n == 0:
            if n:
                out[:] = np.frombuffer(self.read(n), np.uint8)
            return
        if n > self._left:
            raise ValueError(f"the payload claims more than the {self._left} bytes its shape allows")
        self._left -= n
        view, got = memoryview(out).cast("B"), 0
        try:
            while got < n and (step := self._stream.readinto(view[got:])):
                got += step
        except Exception as e:  # zstandard.ZstdError
            raise ValueError(f"the payload is not a valid compressed stream ({e})") from None
        if got != n:
            raise ValueError(f"decoded {got} bytes, expected {n}")

    def _pull(self, n: int) -> bytes | memoryview:
        """Up to ``n`` more bytes (fewer at the end); the decompressors' errors as ``ValueError``."""
        if n <= 0:
            return b""  # (zlib reads max_length=0 as "no limit")
        if self._whole is not None:
            out, self._at = self._whole[self._at : self._at + n], min(self._at + n, len(self._whole))
            return out
        try:
            if self._zlib is not None:
                out = self._zlib.decompress(self._data, n)
                self._data = self._zlib.unconsumed_tail
                return out
            chunks, got = [], 0
            while got < n and (chunk := self._stream.read(n - got)):
                chunks.append(chunk)
                got += len(chunk)
            return b"".join(chunks)
        except Exception as e:  # zlib.error, zstandard.ZstdError
            raise ValueError(f"the payload is not a valid compressed stream ({e})") from None

    def end(self) -> None:
        """``ValueError`` unless the stream holds nothing more (a payload inflating past its tensor's size)."""
        if self._pull(1) or (self._zlib is not None and not self._zlib.eof):
            raise ValueError("the payload inflates to more bytes than its tensor holds (corrupted, or a bomb)")
