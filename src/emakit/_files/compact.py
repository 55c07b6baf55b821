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
further is an error before anything larger is allocated: no decompression bomb). The streams
are :mod:`emakit._files.streams`'s, the only emakit module this one imports.

Decoding is deterministic on the CPU: :func:`encode_delta` returns exactly what
:func:`decode_delta` computes from its bytes, which is what lets a writer keep the
decoded values instead of reading its files back. :func:`decode_deltas` decodes many
tensors with one set of tensor operations, to the same bits.

Example::

    payload = encode_keyframe(x)                      # uint8 tensor, lossless
    payload, scale, decoded = encode_delta(y, decode_keyframe(payload, x.shape))
    a = fit_prediction(z, decoded, [decoded - x])     # z predicted from y's increment
    payload, scale, decoded_z = encode_delta(z, decoded, predictors=[decoded - x], coefficients=a)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy comes with the safetensors / dev installs
    raise ImportError("compact snapshots need numpy: pip install numpy (or use encoding='fp32')") from None
import torch
from torch import Tensor

from . import streams as _streams

#: Largest magnitude of an int16 step; larger ones are stored as escapes.
Q_MAX = 32767
#: Steps per ``max|x - reference|`` of a delta (the step is at most this fine) ...
LEVELS = 40000
#: ... and per root-mean-square of ``x - reference`` (at least this fine, for heavy tails).
RMS_LEVELS = 8000
def _shuffle_deflate(array: np.ndarray) -> Tensor:
    """Byte-shuffle ``array`` (its k-th bytes together) and compress it, as a uint8 tensor."""
    planes = np.ascontiguousarray(array.reshape(-1).view(np.uint8).reshape(-1, array.itemsize).T)
    return _streams.compress(planes.tobytes())


def _inflate_unshuffle(payload: Tensor, dtype: np.dtype, numel: int) -> np.ndarray:
    """Inverse of :func:`_shuffle_deflate`; ``ValueError`` if the bytes are not ``numel`` values of ``dtype``."""
    itemsize = np.dtype(dtype).itemsize
    stream = _streams.inflate(payload, numel * itemsize)
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


def _apply(reference: Tensor, steps: Tensor, scale: float | Tensor) -> Tensor:
    """``reference + steps * scale`` in fp32, ``steps`` (fp32, holding the integer steps) overwritten with it: the
    one formula both writer and reader evaluate (``scale``: a number, or one per element of a batch)."""
    return steps.mul_(scale if isinstance(scale, Tensor) else torch.tensor(scale, dtype=torch.float32)).add_(reference)


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


def _check_predictors(reference: Tensor, predictors: Sequence, coefficients: Sequence[float]) -> None:
    shapes = [t.shape for p in predictors for t in (p if isinstance(p, tuple) else (p,))]
    if len(predictors) != len(coefficients) or any(shape != reference.shape for shape in shapes):
        raise ValueError(f"{len(coefficients)} coefficients need as many predictors of shape {tuple(reference.shape)}")


def _predict(reference: Tensor, predictors: Sequence, coefficients: Sequence[float]) -> Tensor:
    """``reference + sum_k a_k * predictors[k]`` in fp32 (:func:`_base`), shaped like ``reference``."""
    if not coefficients:
        return reference
    _check_predictors(reference, predictors, coefficients)
    return _base([reference], [predictors], [coefficients], [reference.numel()]).view(reference.shape)


def _base(references: list[Tensor], predictors: list, coefficients: list, sizes: list[int]) -> Tensor:
    """``reference + sum_k a_k * predictors[k]`` of each tensor (each with as many coefficients), flat, one after
    another; in fp32, a product and a sum at a time (no fused multiply-add: the same bits on every CPU, and for
    each element whatever the batch). A predictor is a tensor, or a pair ``(m, s)`` that stands for ``m - s``
    (subtracted here, into the tensor the products use: no tensor per predictor)."""
    reference = _joined(references)
    if not coefficients[0]:
        return reference
    term, base = torch.empty(reference.numel(), dtype=torch.float32), None
    for k in range(len(coefficients[0])):
        a, column = _per_element([c[k] for c in coefficients], sizes), [p[k] for p in predictors]
        if all(isinstance(p, tuple) for p in column):
            torch.sub(_joined([p[0] for p in column]), _joined([p[1] for p in column]), out=term).mul_(a)
        else:
            torch.mul(_joined([p[0] - p[1] if isinstance(p, tuple) else p for p in column]), a, out=term)
        base = torch.add(reference, term) if base is None else base.add_(term)
    return base


def _joined(tensors: list[Tensor]) -> Tensor:
    """The tensors' elements one after another (the tensor itself, flat, when there is one)."""
    if len(tensors) == 1:
        return tensors[0].reshape(-1)
    return torch.cat(tensors if all(t.dim() == 1 for t in tensors) else [t.reshape(-1) for t in tensors])


def _per_element(values: list[float], sizes: list[int]) -> Tensor:
    """``values[i]`` (as fp32) for each of the ``sizes[i]`` elements of tensor ``i`` (a 0-d tensor for one)."""
    if len(values) == 1:
        return torch.tensor(values[0], dtype=torch.float32)
    return torch.repeat_interleave(torch.tensor(values, dtype=torch.float32), torch.tensor(sizes))


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
    return _streams.compress(packed.numpy())


def decode_delta(
    payload: Tensor, scale: float, reference: Tensor, *, predictors: Sequence = (), coefficients: Sequence[float] = (),
) -> Tensor:  # fmt: skip
    """The fp32 tensor that :func:`encode_delta` stored as ``payload`` and ``scale`` against ``reference`` (and the
    same ``predictors`` and ``coefficients``; a predictor may also be a pair ``(m, s)`` standing for ``m - s``)."""
    return decode_deltas([payload], [scale], [reference], predictors=[predictors], coefficients=[coefficients])[0]


class PayloadError(ValueError):
    """A payload of :func:`decode_deltas` that cannot be decoded; ``index`` says which."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


#: Elements decoded together: each tensor op costs microseconds however small its tensor, so the small tensors
#: of a file are decoded as one array, a few MiB at a time (cache-sized).
BATCH_NUMEL = 1 << 20


def decode_deltas(
    payloads: Sequence[Tensor], scales: Sequence[float], references: Sequence[Tensor], *,
    predictors: Sequence[Sequence] | None = None, coefficients: Sequence[Sequence[float]] | None = None,
) -> list[Tensor]:  # fmt: skip
    """:func:`decode_delta` of each ``(payloads[i], scales[i], references[i], ...)``, many at once: tensors with as
    many coefficients are decoded together, one set of tensor operations per :data:`BATCH_NUMEL` elements, to the
    same bits (every element goes through the same operations). The values may share memory. A payload that
    cannot be decoded raises :class:`PayloadError` (a ``ValueError``) naming its index."""
    predictors = list(predictors) if predictors is not None else [()] * len(payloads)
    coefficients = list(coefficients) if coefficients is not None else [()] * len(payloads)
    for reference, p, c in zip(references, predictors, coefficients):
        _check_predictors(reference, p, c)
    runs: dict[int, list[list[int]]] = {}  # coefficient count -> batches of indices
    filled: dict[int, int] = {}
    for i, (reference, c) in enumerate(zip(references, coefficients)):
        batches = runs.setdefault(len(c), [[]])
        if batches[-1] and filled[len(c)] + reference.numel() > BATCH_NUMEL:
            batches.append([])
            filled[len(c)] = 0
        batches[-1].append(i)
        filled[len(c)] = filled.get(len(c), 0) + reference.numel()
    out: list = [None] * len(payloads)
    for batch in (b for batches in runs.values() for b in batches):
        sizes = [references[i].numel() for i in batch]
        low, high = torch.empty(sum(sizes), dtype=torch.uint8), torch.empty(sum(sizes), dtype=torch.uint8)
        where, values, at, low_bytes, high_bytes = [], [], 0, low.numpy(), high.numpy()
        for i, size in zip(batch, sizes):
            try:
                escapes = _inflate_steps(payloads[i], size, low_bytes[at : at + size], high_bytes[at : at + size])
            except ValueError as e:
                raise PayloadError(i, str(e)) from None
            if len(escapes[0]):
                where.append(escapes[0].astype(np.int64) + at)
                values.append(escapes[1])
            at += size
        base = _base([references[i] for i in batch], [predictors[i] for i in batch], [coefficients[i] for i in batch],
                     sizes)  # fmt: skip
        # An int16 step is (signed high byte) * 256 + (low byte): summed in fp32 (exact), no byte transpose.
        steps = high.view(torch.int8).to(torch.float32)
        torch.add(low.to(torch.float32), steps, alpha=256, out=steps)
        if where:
            steps[torch.from_numpy(np.concatenate(where))] = torch.from_numpy(np.concatenate(values)).to(torch.float32)
        _apply(base, steps, _per_element([scales[i] for i in batch], sizes))
        for i, value in zip(batch, steps.split(sizes)):
            out[i] = value if references[i].dim() == 1 else value.view(references[i].shape)
    return out


def _inflate_steps(payload: Tensor, numel: int, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A delta's ``numel`` step bytes into ``low`` and ``high`` (uint8 arrays); its escapes, ``(indices, values)``."""
    stream = _streams.inflate(payload, 10 * numel + 4)  # at most: every step an escape
    stream.read_into(low)
    stream.read_into(high)
    count = int.from_bytes(stream.read(4), "little", signed=True)
    if not 0 <= count <= numel:
        raise ValueError(f"the payload says {count} escapes among {numel} steps")
    escapes = np.frombuffer(stream.read(8 * count), np.int32)
    stream.end()
    where = escapes[:count]
    if count and not (where.min() >= 0 and where.max() < numel):
        raise ValueError(f"the payload places an escape outside its {numel} steps")
    return where, escapes[count:]
