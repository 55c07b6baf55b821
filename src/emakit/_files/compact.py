"""The compact snapshot codec: pure functions between fp32 tensors and compressed bytes (zstd, or zlib).

Compact snapshots store each average either as a *keyframe* (its fp32 bits) or as a
*delta* against the decoded value of the same tensor in an earlier snapshot (its
*reference*):

- keyframe: the fp32 bytes, byte-shuffled (all first bytes, then all second bytes, ...,
  so the sign/exponent bytes compress) and compressed: lossless.
- delta: ``q = round((x - reference) / scale)``, one ``scale`` per tensor,
  ``scale = min(rms / 8000, max / 40000)`` of ``|x - reference|``, rounded to fp32; the steps
  as int16 (byte-shuffled), the few beyond int16's range (tails past ~4 rms) as int32
  escapes (count, indices, values) after them, all compressed. For Gaussian steps the two
  bounds agree (max is about 5 rms); for the heavy-tailed deltas of real training (max 7 to
  11 rms in large weight matrices) the rms bound halves the step, and so the error, for
  about 5% more bytes (benchmarks/bench_storage.py --demo-run). 40000 levels rather than
  32767 cut the error 18% for ~2% more bytes.
  Decoding is ``reference + q * scale`` in fp32. The writer encodes against the
  *decoded* reference (closed loop), so each snapshot's error is at most ``scale / 2``
  plus one fp32 rounding, and errors do not accumulate along a chain.
- predicted delta (newer files): the same, but the steps count from a prediction,
  ``q = round((x - base) / scale)`` with ``base = reference + sum_k a_k * predictor_k``, the
  coefficients ``a`` (fp32, in the header) a least-squares fit (:func:`fit_prediction`)
  and the predictors other decoded tensors the caller names (the writer: the increments of
  the other profiles at this time, and the tensor's own increment the time before). The
  scale stays that of ``x - reference``, so the error stays the same while the steps
  shrink: 8 to 10% fewer bytes on a random walk and on a training run. ``base`` is summed a
  product at a time (no fused multiply-add), so it is the same on every CPU.

Compression is zstd (level 1) where the ``zstandard`` package is installed (``emakit[fast]``),
else zlib (level 6): the same bytes within 0.2% on these streams (their low bytes are noise),
zstd some 30x faster in both directions. Decoding tells them apart by their first bytes,
so files of either kind (and those of 0.1, all zlib) decode anywhere zstandard is installed.
Decoding inflates at most the bytes the tensor's shape allows (a payload that would inflate
further is an error before anything larger is allocated: no decompression bomb).

Decoding is deterministic on the CPU: :func:`encode_delta` returns exactly what
:func:`decode_delta` computes from its bytes, which is what lets a writer keep the
decoded values instead of reading its files back. Imports no other emakit module.

Example::

    payload = encode_keyframe(x)                      # uint8 tensor, lossless
    payload, scale, decoded = encode_delta(y, decode_keyframe(payload, x.shape))
    a = fit_prediction(z, decoded, [decoded - x])     # z predicted from y's increment
    payload, scale, decoded_z = encode_delta(z, decoded, predictors=[decoded - x], coefficients=a)
"""

from __future__ import annotations

import ctypes
import io
import math
import zlib
from collections.abc import Callable, Sequence
from typing import Any

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy comes with the safetensors / dev installs
    raise ImportError("compact snapshots need numpy: pip install numpy (or use encoding='fp32')") from None
import torch
from torch import Tensor

#: Largest magnitude of an int16 step; larger ones are stored as escapes.
Q_MAX = 32767
#: Steps per ``max|x - reference|`` of a delta (the step is at most this fine) ...
LEVELS = 40000
#: ... and per root-mean-square of ``x - reference`` (at least this fine, for heavy tails).
RMS_LEVELS = 8000
#: zlib level: 6 (zlib's default) is within 1% of 9 in size here at about a third of the time.
ZLIB_LEVEL = 6
#: zstd level: 1 beats zstd's default 3 on these streams, in bytes (0.754x against 0.771x of a predicted delta's
#: packed steps) and speed (about 6x faster to compress, 2x to inflate: 3 searches matches that noise lacks).
ZSTD_LEVEL = 1
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _zstd():
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def _compress(raw) -> Tensor:
    """``raw`` (bytes, or a contiguous uint8 array) compressed (zstd, else zlib), as a uint8 tensor."""
    zstandard = _zstd()
    if zstandard is not None:
        packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=2 if len(raw) > 8 << 20 else 0).compress(raw)
    else:
        packed = zlib.compress(raw, ZLIB_LEVEL)
    return torch.frombuffer(bytearray(packed), dtype=torch.uint8)


def _inflate(payload: Tensor, limit: int):
    """A reader of the uncompressed bytes of ``payload`` that stops at ``limit`` (``.read(n)``, ``.end()``)."""
    data = payload.contiguous().numpy().tobytes()
    return _Inflated(data, limit)


class _Inflated:
    """Bounded reading of a zstd or zlib stream: never more than ``limit`` bytes come out of it.

    A zstd frame that states its size (emakit writes such frames) is inflated in one call once that size is
    checked against the limit, twice as fast as streaming it; other frames, and zlib, are streamed.
    """

    def __init__(self, data: bytes, limit: int) -> None:
        self._left, self._zlib, self._whole, self._at = limit, None, None, 0
        if data[:4] != _ZSTD_MAGIC:
            self._zlib, self._data = zlib.decompressobj(), data
            return
        zstandard = _zstd()
        if zstandard is None:
            raise ImportError("this compact snapshot is zstd-compressed: pip install zstandard (or 'emakit[fast]')")
        try:
            size = zstandard.frame_content_size(data)  # -1: not stated
            if size > limit:
                raise ValueError(f"the payload claims {size} bytes, more than the {limit} its shape allows")
            if size >= 0:
                self._whole = memoryview(zstandard.ZstdDecompressor().decompress(data))
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

    def read_into(self, out: Tensor) -> None:
        """Fill the uint8 tensor ``out`` (inflated into it when zstd streams); errors as :meth:`read`."""
        n = out.numel()
        if self._whole is not None or self._zlib is not None or n == 0:
            if n:
                view = self.read(n)
                memoryview(_buffer_of(out)).cast("B")[:] = view
            return
        if n > self._left:
            raise ValueError(f"the payload claims more than the {self._left} bytes its shape allows")
        self._left -= n
        view, got = memoryview(_buffer_of(out)).cast("B"), 0
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


def _shuffle_deflate(array: np.ndarray) -> Tensor:
    """Byte-shuffle ``array`` (its k-th bytes together) and compress it, as a uint8 tensor."""
    planes = np.ascontiguousarray(array.reshape(-1).view(np.uint8).reshape(-1, array.itemsize).T)
    return _compress(planes.tobytes())


def _inflate_unshuffle(payload: Tensor, dtype: np.dtype, numel: int) -> np.ndarray:
    """Inverse of :func:`_shuffle_deflate`; ``ValueError`` if the bytes are not ``numel`` values of ``dtype``."""
    itemsize = np.dtype(dtype).itemsize
    stream = _inflate(payload, numel * itemsize)
    raw = stream.read(numel * itemsize)
    stream.end()
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(itemsize, numel)
    return np.ascontiguousarray(planes.T).view(dtype).reshape(-1)


def encode_keyframe(x: Tensor) -> Tensor:
    """``x`` cast to fp32, as lossless compressed bytes (a uint8 tensor)."""
    return _shuffle_deflate(x.detach().to("cpu", torch.float32).contiguous().numpy())


def decode_keyframe(payload: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The fp32 tensor of ``shape`` that :func:`encode_keyframe` stored in ``payload``."""
    numel = int(np.prod(shape, dtype=np.int64))
    values = _inflate_unshuffle(payload, np.float32, numel)  # a fresh array, but for one element (a view of the bytes)
    return torch.from_numpy(values if values.flags.writeable else values.copy()).reshape(shape)


def _apply(reference: Tensor, steps: Tensor, scale: float) -> Tensor:
    """``reference + steps * scale`` in fp32, ``steps`` (fp32, holding the integer steps) overwritten with it: the
    one formula both writer and reader evaluate."""
    return steps.mul_(torch.tensor(scale, dtype=torch.float32)).add_(reference)


def _buffer_of(tensor: Tensor):
    """The bytes of a contiguous CPU tensor in place, as a ctypes array (what readers fill)."""
    flat = tensor.reshape(-1).view(torch.uint8)
    return (ctypes.c_char * flat.numel()).from_address(flat.data_ptr())


def fit_prediction(x: Tensor, reference: Tensor, predictors: Sequence[Tensor]) -> tuple[float, ...]:
    """Coefficients ``a`` (fp32 values) of the least-squares ``x - reference ~ sum_k a_k * predictors[k]``, or ``()``
    where there is nothing to predict or the fit explains under 1% of the delta's energy.

    Fitted in fp32 with fp64 normal equations: the coefficients need not be exact, only the
    same at both ends (they are stored).
    """
    if not predictors or x.numel() == 0:
        return ()
    d = (x.detach().to("cpu", torch.float32) - reference).reshape(-1)
    columns = [p.reshape(-1) for p in predictors]
    m = len(columns)
    gram = torch.zeros(m, m, dtype=torch.float64)
    for a in range(m):
        for b in range(a + 1):
            gram[a, b] = gram[b, a] = float(torch.dot(columns[a], columns[b]))
    rhs = torch.tensor([float(torch.dot(c, d)) for c in columns], dtype=torch.float64)
    energy = float(torch.dot(d, d))
    if not (math.isfinite(energy) and energy > 0 and bool(torch.isfinite(gram).all())):
        return ()
    solution = torch.linalg.lstsq(gram, rhs.unsqueeze(1), driver="gelsd").solution.reshape(-1)
    coefficients = tuple(float(np.float32(a)) for a in solution)
    if not all(math.isfinite(a) for a in coefficients) or float(solution @ rhs) < 0.01 * energy:
        return ()  # (for least squares, solution . rhs is the energy the fit explains)
    return coefficients


def _peak(values: Tensor) -> float:
    """``max |values|`` in one pass (0 for none)."""
    if not values.numel():
        return 0.0
    low, high = torch.aminmax(values)
    return max(-float(low), float(high))


def _peak_rms(diff: Tensor) -> tuple[float, float]:
    """``max |diff|`` and its root mean square, 0 for an empty tensor."""
    if not diff.numel():
        return 0.0, 0.0
    flat = diff.reshape(-1)
    return _peak(flat), math.sqrt(float(torch.dot(flat, flat)) / flat.numel())


def _predict(reference: Tensor, predictors: Sequence, coefficients: Sequence[float]) -> Tensor:
    """``reference + sum_k a_k * predictors[k]`` in fp32, a product and a sum at a time (no fused multiply-add:
    the same bits on every CPU). A predictor is a tensor, or a pair ``(m, s)`` that stands for ``m - s``
    (subtracted here, into the tensor the products use: no tensor per predictor)."""
    if not coefficients:
        return reference
    shapes = [t.shape for p in predictors for t in (p if isinstance(p, tuple) else (p,))]
    if len(predictors) != len(coefficients) or any(shape != reference.shape for shape in shapes):
        raise ValueError(f"{len(coefficients)} coefficients need as many predictors of shape {tuple(reference.shape)}")
    term, base = torch.empty(reference.shape, dtype=torch.float32), None
    for a, p in zip(coefficients, predictors):
        if isinstance(p, tuple):
            term = torch.sub(*p, out=term).mul_(torch.tensor(a, dtype=torch.float32))
        else:
            term = torch.mul(p, torch.tensor(a, dtype=torch.float32), out=term)
        base = torch.add(reference, term) if base is None else base.add_(term)
    return base


def encode_delta(
    x: Tensor, reference: Tensor, levels: int = LEVELS, *, predictors: Sequence[Tensor] = (),
    coefficients: Sequence[float] = (), compress: Callable[[Tensor], Any] | None = None,
) -> tuple[Any, float, Tensor]:  # fmt: skip
    """``x`` as int16 steps of one scale from ``reference`` (fp32, CPU): ``(payload, scale, decoded)``.

    ``decoded`` is bit for bit what :func:`decode_delta` returns for this payload and
    scale; ``|decoded - x| <= scale / 2`` up to one fp32 rounding, with
    ``scale = min(rms / RMS_LEVELS, max / levels)`` of ``|x - reference|``. With
    ``coefficients`` (:func:`fit_prediction`), the steps count from the prediction
    ``reference + sum_k a_k * predictors[k]`` instead: the same scale, so the same error, and
    fewer bytes as the prediction comes closer than the reference. ``compress``: what turns the
    packed steps (a uint8 tensor) into the payload, returned as it is (a future, say, that
    compresses them on another thread); by default the payload itself.
    """
    if reference.dtype != torch.float32 or reference.device.type != "cpu" or reference.shape != x.shape:
        raise ValueError(
            f"encode_delta: reference must be an fp32 CPU tensor of shape {tuple(x.shape)}, got "
            f"{reference.dtype} on {reference.device} of shape {tuple(reference.shape)}"
        )
    # In fp32: the decoded value is fp32 anyway, and q only has to be the steps that decode closest.
    x32 = x.detach().to("cpu", torch.float32)
    diff = x32 - reference
    peak, rms = _peak_rms(diff)
    scale = float(np.float32(min(peak / levels, rms / RMS_LEVELS)))
    base = _predict(reference, predictors, coefficients)
    if base is not reference:
        diff = x32 - base
        peak = _peak(diff)
        if scale == 0:  # no change, but a prediction that moved: steps back to x
            peak, rms = _peak_rms(diff)
            scale = float(np.float32(min(peak / levels, rms / RMS_LEVELS)))
    if scale > 0 and peak / scale >= 2**31 - 1:  # steps must fit int32 (a few huge outliers among zeros)
        scale = float(np.float32(peak / (2**31 - 2)))
    if scale > 0:
        steps = torch.round_(diff.div_(torch.tensor(scale, dtype=torch.float32))).reshape(-1)  # whole numbers, fp32
    else:
        steps = torch.zeros(x.numel(), dtype=torch.float32)
    q = steps.to(torch.int32)
    # Steps beyond int16 (the tails, when levels > Q_MAX) are escapes: index and value as int32, after the int16s.
    if _peak(steps) > Q_MAX:
        where = torch.nonzero(q.abs() > Q_MAX).reshape(-1).to(torch.int32)
        escapes, q = q[where.long()], q.clamp(-Q_MAX, Q_MAX)
    else:
        where = escapes = torch.zeros(0, dtype=torch.int32)
    packed = torch.cat([  # the int16 bytes shuffled (all low bytes, then all signed high bytes), then the escapes
        q.bitwise_and(0xFF).to(torch.uint8), q.bitwise_right_shift(8).to(torch.uint8),
        torch.tensor([len(where)], dtype=torch.int32).view(torch.uint8), where.view(torch.uint8),
        escapes.view(torch.uint8),
    ])  # fmt: skip
    payload = (compress or compress_packed)(packed)
    return payload, scale, _apply(base, steps.view(x.shape), scale)  # the steps as the decoder sees them


def compress_packed(packed: Tensor) -> Tensor:
    """The payload of a delta's packed steps (:func:`encode_delta`'s ``compress``)."""
    return _compress(packed.numpy())


def decode_delta(
    payload: Tensor, scale: float, reference: Tensor, *, predictors: Sequence[Tensor] = (),
    coefficients: Sequence[float] = (),
) -> Tensor:  # fmt: skip
    """The fp32 tensor that :func:`encode_delta` stored as ``payload`` and ``scale`` against ``reference`` (and the
    same ``predictors`` and ``coefficients``)."""
    base = _predict(reference, predictors, coefficients)
    numel = reference.numel()
    stream = _inflate(payload, 10 * numel + 4)  # at most: every step an escape
    head = torch.empty(2 * numel + 4, dtype=torch.uint8)  # low bytes, high bytes, escape count
    stream.read_into(head)
    count = int.from_bytes(head[2 * numel :].numpy().tobytes(), "little", signed=True)
    if not 0 <= count <= numel:
        raise ValueError(f"the payload says {count} escapes among {numel} steps")
    escapes = np.frombuffer(stream.read(8 * count), np.int32)
    stream.end()
    # An int16 step is (signed high byte) * 256 + (low byte): summed in fp32 (exact), no byte transpose.
    steps = head[numel : 2 * numel].view(torch.int8).to(torch.float32)
    torch.add(head[:numel].to(torch.float32), steps, alpha=256, out=steps)
    if count:
        where, values = torch.from_numpy(escapes[:count].copy()), torch.from_numpy(escapes[count:].copy())
        steps[where.long()] = values.to(torch.float32)
    return _apply(base.reshape(-1), steps, scale).reshape(reference.shape)
