"""The compact snapshot codec: pure functions between fp32 tensors and zlib-compressed bytes.

Compact snapshots store each average either as a *keyframe* (its fp32 bits) or as a
*delta* against the decoded value of the same tensor in an earlier snapshot (its
*reference*):

- keyframe: the fp32 bytes, byte-shuffled (all first bytes, then all second bytes, ...,
  so the sign/exponent bytes compress) and deflated: lossless.
- delta: ``q = round((x - reference) / scale)``, one ``scale`` per tensor,
  ``scale = min(rms / 8000, max / 40000)`` of ``|x - reference|``, rounded to fp32; the steps
  as int16 (byte-shuffled), the few beyond int16's range (tails past ~4 rms) as int32
  escapes (count, indices, values) after them, all deflated. For Gaussian steps the two
  bounds agree (max is about 5 rms); for the heavy-tailed deltas of real training (max 7 to
  11 rms in large weight matrices) the rms bound halves the step, and so the error, for
  about 5% more bytes (benchmarks/bench_storage.py --demo-run). 40000 levels rather than
  32767 cut the error 18% for ~2% more bytes.
  Decoding is ``reference + q * scale`` in fp32. The writer encodes against the
  *decoded* reference (closed loop), so each snapshot's error is at most ``scale / 2``
  plus one fp32 rounding, and errors do not accumulate along a chain.

Decoding is deterministic on the CPU: :func:`encode_delta` returns exactly what
:func:`decode_delta` computes from its bytes, which is what lets a writer keep the
decoded values instead of reading its files back. Imports no other emakit module.

Example::

    payload = encode_keyframe(x)                      # uint8 tensor, lossless
    payload, scale, decoded = encode_delta(y, decode_keyframe(payload, x.shape))
"""

from __future__ import annotations

import zlib

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


def _shuffle_deflate(array: np.ndarray) -> Tensor:
    """Byte-shuffle ``array`` (its k-th bytes together) and deflate it, as a uint8 tensor."""
    planes = np.ascontiguousarray(array.reshape(-1).view(np.uint8).reshape(-1, array.itemsize).T)
    return torch.frombuffer(bytearray(zlib.compress(planes.tobytes(), ZLIB_LEVEL)), dtype=torch.uint8)


def _inflate_unshuffle(payload: Tensor, dtype: np.dtype, numel: int) -> np.ndarray:
    """Inverse of :func:`_shuffle_deflate`; ``ValueError`` if the bytes are not ``numel`` values of ``dtype``."""
    raw = zlib.decompress(payload.contiguous().numpy().tobytes())
    itemsize = np.dtype(dtype).itemsize
    if len(raw) != numel * itemsize:
        raise ValueError(f"decoded {len(raw)} bytes, expected {numel} values of {np.dtype(dtype)} ({numel * itemsize})")
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(itemsize, numel)
    return np.ascontiguousarray(planes.T).view(dtype).reshape(-1)


def encode_keyframe(x: Tensor) -> Tensor:
    """``x`` cast to fp32, as lossless compressed bytes (a uint8 tensor)."""
    return _shuffle_deflate(x.detach().to("cpu", torch.float32).contiguous().numpy())


def decode_keyframe(payload: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The fp32 tensor of ``shape`` that :func:`encode_keyframe` stored in ``payload``."""
    numel = int(np.prod(shape, dtype=np.int64))
    return torch.from_numpy(_inflate_unshuffle(payload, np.float32, numel).copy()).reshape(shape)


def _apply(reference: Tensor, q: Tensor, scale: float) -> Tensor:
    """``reference + q * scale`` in fp32: the one formula both writer and reader evaluate."""
    return reference + q.to(torch.float32) * torch.tensor(scale, dtype=torch.float32)


def encode_delta(x: Tensor, reference: Tensor, levels: int = LEVELS) -> tuple[Tensor, float, Tensor]:
    """``x`` as int16 steps of one scale from ``reference`` (fp32, CPU): ``(payload, scale, decoded)``.

    ``decoded`` is bit for bit what :func:`decode_delta` returns for this payload and
    scale; ``|decoded - x| <= scale / 2`` up to one fp32 rounding, with
    ``scale = min(rms / RMS_LEVELS, max / levels)`` of ``|x - reference|``.
    """
    if reference.dtype != torch.float32 or reference.device.type != "cpu" or reference.shape != x.shape:
        raise ValueError(
            f"encode_delta: reference must be an fp32 CPU tensor of shape {tuple(x.shape)}, got "
            f"{reference.dtype} on {reference.device} of shape {tuple(reference.shape)}"
        )
    diff = x.detach().to("cpu", torch.float64) - reference.to(torch.float64)
    peak = float(diff.abs().max()) if diff.numel() else 0.0
    rms = float(diff.square().mean().sqrt()) if diff.numel() else 0.0
    scale = float(np.float32(min(peak / levels, rms / RMS_LEVELS)))
    if scale > 0 and peak / scale >= 2**31 - 1:  # steps must fit int32 (a few huge outliers among zeros)
        scale = float(np.float32(peak / (2**31 - 2)))
    if scale > 0:
        q = torch.round(diff / scale).to(torch.int32)
    else:
        q = torch.zeros(x.shape, dtype=torch.int32)
    # Steps beyond int16 (the tails, when levels > Q_MAX) are escapes: index and value as int32, after the int16s.
    flat = q.reshape(-1)
    where = torch.nonzero(flat.abs() > Q_MAX).reshape(-1).to(torch.int32)
    steps = flat.clamp(-Q_MAX, Q_MAX).to(torch.int16).numpy().view(np.uint8).reshape(-1, 2).T.reshape(-1)
    count = np.array([len(where)], dtype=np.int32).view(np.uint8)
    packed = np.concatenate([steps, count, where.numpy().view(np.uint8), flat[where.long()].numpy().view(np.uint8)])
    payload = torch.frombuffer(bytearray(zlib.compress(packed.tobytes(), ZLIB_LEVEL)), dtype=torch.uint8)
    return payload, scale, _apply(reference, q, scale)


def decode_delta(payload: Tensor, scale: float, reference: Tensor) -> Tensor:
    """The fp32 tensor that :func:`encode_delta` stored as ``payload`` and ``scale`` against ``reference``."""
    numel = reference.numel()
    raw = zlib.decompress(payload.contiguous().numpy().tobytes())
    count = int(np.frombuffer(raw, dtype=np.int32, count=1, offset=2 * numel)[0]) if len(raw) >= 2 * numel + 4 else -1
    if count < 0 or len(raw) != 2 * numel + 4 + 8 * count:
        raise ValueError(f"decoded {len(raw)} bytes, expected {numel} int16 steps and their escapes")
    q = (
        np.ascontiguousarray(np.frombuffer(raw, np.uint8, 2 * numel).reshape(2, numel).T)
        .view(np.int16)
        .astype(np.int32)
    )
    where = np.frombuffer(raw, np.int32, count, 2 * numel + 4)
    q = q.reshape(-1)
    q[where] = np.frombuffer(raw, np.int32, count, 2 * numel + 4 + 4 * count)
    return _apply(reference, torch.from_numpy(q).reshape(reference.shape), scale)
