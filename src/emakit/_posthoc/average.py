"""Averaging ordinary checkpoints, streamed: a uniform mean, or the EMA of any length rebuilt from them.

One checkpoint is in memory at a time, beside the float32 (or float64) accumulators: peak
extra memory is the output plus one checkpoint, whatever the number of files. Floating
tensors are averaged with the checkpoints' weights (:mod:`emakit._posthoc.raw_weights`);
integer and bool tensors (``num_batches_tracked``, step counters) are taken from the newest
checkpoint, never averaged. Every checkpoint must hold the same names, shapes and kinds of
tensor as the first one read, and only finite floats: anything else raises
:class:`~emakit._posthoc.raw_files.CheckpointSourceError` naming the file and tensor, before
anything is written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._files import collector as _collector
from . import raw_weights
from .raw_files import WHERE, CheckpointSourceError, RawCheckpoint, find

#: Elements of every checkpoint kept to measure the change between checkpoints (error estimate).
SAMPLE = 1 << 20


@dataclass
class Averaged:
    """The average of raw checkpoints, and what it was made of."""

    state_dict: dict[str, Tensor]
    #: What was computed: ``"uniform mean of 5 checkpoints"`` / ``"sigma_rel=0.05 at t=8000"``.
    target: str
    #: The time of the result (the newest checkpoint used).
    t: float
    #: ``(path, t, weight)`` of every checkpoint read, oldest first (weights sum to 1).
    used: list[tuple[str, float, float]]
    #: EMA targets: the profile's mass before the first checkpoint (held at its value there).
    mass_before_first: float | None = None
    #: EMA targets: the largest mass between two consecutive checkpoints (sparse checkpoints show here).
    largest_gap_mass: float | None = None
    #: EMA targets: estimated rms error per element against the exact EMA (see raw_weights).
    error_estimate: float | None = None
    #: Checkpoints not read because their weight was negligible (< 1e-10 of the total).
    skipped: int = 0

    def summary(self) -> str:
        """A few lines for people: what, from which checkpoints, and how well they support it."""
        ts = [t for _, t, _ in self.used]
        lines = [f"{self.target} from {len(self.used)} checkpoints (t={ts[0]:g} .. {ts[-1]:g})"]
        if self.error_estimate is not None:
            rms = _rms(self.state_dict)
            lines.append(
                f"profile mass before the first checkpoint {self.mass_before_first:.3g}, largest between two "
                f"checkpoints {self.largest_gap_mass:.3g}; estimated error vs the exact EMA "
                f"{self.error_estimate:.3g} rms per element ({self.error_estimate / max(rms, 1e-30):.2%} of the weights' rms)"
            )
        if self.skipped:
            lines.append(f"{self.skipped} older checkpoints weigh < 1e-10 and were not read")
        return "\n".join(lines)


def _rms(tensors: Mapping[str, Tensor]) -> float:
    total, count = 0.0, 0
    for v in tensors.values():
        if v.is_floating_point():
            total += float(v.double().square().sum())
            count += v.numel()
    return (total / max(count, 1)) ** 0.5


def _select(
    found: list[RawCheckpoint], last: int | None, steps: tuple[float, float] | None, t: float | None
) -> list[RawCheckpoint]:
    if t is not None:
        if not any(c.t == t for c in found):
            raise CheckpointSourceError(
                f"{WHERE}: t={t:g} is no checkpoint's time; the checkpoints are at t={[c.t for c in found]}"
            )
        found = [c for c in found if c.t <= t]
    if steps is not None:
        lo, hi = steps
        found = [c for c in found if lo <= c.t <= hi]
        if not found:
            raise CheckpointSourceError(f"{WHERE}: no checkpoint has {lo:g} <= t <= {hi:g}")
    if last is not None:
        found = found[-last:]
    return found


def _check_mode(last, steps, ema: dict[str, Any], accumulate: torch.dtype, dtype: torch.dtype | None) -> None:
    if accumulate not in (torch.float32, torch.float64):
        raise ValueError(f"{WHERE}: accumulate must be torch.float32 or torch.float64, got {accumulate!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{WHERE}: dtype must be a floating torch.dtype or None, got dtype={dtype!r}")
    given = [k for k, v in {"last": last, "steps": steps, **ema}.items() if v is not None]
    if len(given) > 1:
        raise ValueError(f"{WHERE}: give at most one of last, steps, sigma_rel, gamma, decay, halflife; got {given}")
    if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 1):
        raise ValueError(f"{WHERE}: last must be an int >= 1, got last={last!r}")
    if steps is not None:
        if not (isinstance(steps, Sequence) and len(steps) == 2 and all(isinstance(s, (int, float)) for s in steps)):
            raise ValueError(f"{WHERE}: steps must be a pair (first, last) of times, got steps={steps!r}")
        if steps[0] > steps[1]:
            raise ValueError(f"{WHERE}: steps must be (first, last) with first <= last, got steps={tuple(steps)}")


@_collector.paused()
def average_checkpoints(
    checkpoints: Any,
    *,
    last: int | None = None,
    steps: tuple[float, float] | None = None,
    sigma_rel: float | None = None,
    gamma: float | None = None,
    decay: float | None = None,
    halflife: float | None = None,
    t: float | None = None,
    times: Sequence[float] | None = None,
    key: str | None = None,
    step_key: str | None = None,
    trust: bool = False,
    dtype: torch.dtype | None = None,
    accumulate: torch.dtype = torch.float32,
    progress: Callable[[int], Any] | bool = False,
) -> Averaged:
    """Average ordinary training checkpoints: a uniform mean, or the EMA of any length rebuilt from them.

    ``checkpoints``: a directory of checkpoints, a glob (``"run/ckpt_*.pt"``), one path or a
    list of paths: ``torch.save`` files (a state dict, or one nested under ``state_dict`` /
    ``model`` / ``module`` / ... or ``key=``, e.g. ``key="ema"``), safetensors files,
    ``save_pretrained`` / Trainer ``checkpoint-*`` folders, Lightning ``.ckpt`` files, DCP
    directories (``trust=True``). Each one's step ``t`` comes from ``times=``, else from the
    file (``step_key=``, Lightning's ``global_step``, ``trainer_state.json``), else from its
    name (``checkpoint-1500``, ``epoch=3-step=1500.ckpt``, ``ckpt_1500.pt``).

    What is computed (at most one of):

    - nothing, ``last=N`` or ``steps=(a, b)``: the uniform mean of all, the newest ``N``, or
      those with ``a <= t <= b`` (fairseq's ``average_checkpoints.py``, except that integer
      tensors come from the newest checkpoint instead of being divided);
    - ``sigma_rel`` / ``gamma`` (power EMA, EDM2) or ``decay`` / ``halflife`` (classic EMA, per
      unit of ``t``): the EMA at the newest checkpoint (or ``t=``) rebuilt from the raw
      weights by piecewise-linear quadrature; the result reports the profile mass before the
      first checkpoint and an estimate of the error against the exact EMA.

    Streamed: one checkpoint in memory beside the ``accumulate`` sums (float32 or float64);
    outputs in the newest checkpoint's dtypes unless ``dtype=``. A pickle needs ``trust=True``.
    Different names or shapes between checkpoints, or NaN/Inf, raise :class:`CheckpointSourceError`
    naming file and tensor. Returns an :class:`Averaged`; :func:`save_average` writes it.

        avg = posthoc.average_checkpoints("run/checkpoints", sigma_rel=0.05)
        print(avg.summary())
        posthoc.save_average(avg, "run/ema-0.05.safetensors")
    """
    ema = {"sigma_rel": sigma_rel, "gamma": gamma, "decay": decay, "halflife": halflife}
    _check_mode(last, steps, ema, accumulate, dtype)
    chosen = _select(find(checkpoints, times=times, step_key=step_key, trust=trust), last, steps, t)
    ts = [c.t for c in chosen]
    if any(v is not None for v in ema.values()):
        p = raw_weights.profile(ts[-1], **ema)
        quad = raw_weights.hat_weights(ts, p)
        weights, target = quad.weights, p.label()
    else:
        quad, weights = None, [1.0 / len(chosen)] * len(chosen)
        target = f"uniform mean of {len(chosen)} checkpoints"
    return average_many(chosen, [weights], [target], quad=[quad] if quad else None, key=key, trust=trust,
                        accumulate=accumulate, dtype=dtype, progress=progress)[0]


@_collector.paused()
def average_many(
    chosen: list[RawCheckpoint],
    rows: list[list[float]],
    targets: list[str],
    *,
    quad: list[raw_weights.Quadrature] | None,
    key: str | None,
    trust: bool,
    accumulate: torch.dtype,
    dtype: torch.dtype | None,
    progress: Callable[[int], Any] | bool,
) -> list[Averaged]:
    """Several averages of the same checkpoints in one pass (``rows``: a weight per checkpoint each)."""
    ts = [c.t for c in chosen]
    needed = [i for i in range(len(chosen)) if any(r[i] >= raw_weights.NEGLIGIBLE for r in rows)]
    needed = sorted({*needed, len(chosen) - 1})
    first = needed[0]
    read = [chosen[i] for i in needed]
    states, changes = _stream(
        read, [[r[i] for i in needed] for r in rows], uniform=quad is None, key=key, trust=trust,
        accumulate=accumulate, dtype=dtype, progress=progress, sample=quad is not None,
    )  # fmt: skip
    out = []
    for j, (state, target) in enumerate(zip(states, targets)):
        used = [(str(chosen[i].path), ts[i], rows[j][i]) for i in needed]
        averaged = Averaged(state, target, ts[-1], used, skipped=first)
        if quad is not None:
            q = quad[j]
            averaged.mass_before_first = q.mass_before_first
            averaged.largest_gap_mass = max(q.interval_mass, default=0.0)
            averaged.error_estimate = raw_weights.error_estimate(q, [None] * first + changes, ts)
        out.append(averaged)
    return out


def _stream(
    chosen: list[RawCheckpoint],
    rows: list[list[float]],
    *,
    uniform: bool,
    key: str | None,
    trust: bool,
    accumulate: torch.dtype,
    dtype: torch.dtype | None,
    progress: Callable[[int], Any] | bool,
    sample: bool,
) -> tuple[list[dict[str, Tensor]], list[float]]:
    """Read each checkpoint once, oldest first; returns the averages and the mean squared change between neighbours."""
    sums: list[dict[str, Tensor]] = [{} for _ in rows]
    newest: dict[str, Tensor] = {}
    out_dtypes: dict[str, torch.dtype] = {}
    reference: dict[str, tuple[tuple[int, ...], bool, torch.dtype]] = {}
    changes: list[float] = []
    previous: Tensor | None = None
    bar = _bar(progress, len(chosen))
    try:
        for i, ck in enumerate(chosen):
            tensors = ck.tensors(key, trust)
            _check_same(ck, tensors, reference, chosen[0])
            is_newest = i == len(chosen) - 1
            for name, x in tensors.items():
                if not x.is_floating_point():
                    if is_newest:
                        newest[name] = x.clone()
                    continue
                _check_finite(ck, name, x)
                if is_newest:
                    out_dtypes[name] = dtype or x.dtype
                for row, acc in zip(rows, sums):
                    _accumulate(acc, name, x, None if uniform else row[i], accumulate)
            if sample:
                current = _sample(tensors)
                if previous is not None:
                    changes.append(float((current - previous).square().mean()))
                previous = current
            del tensors
            bar.update(1)
    finally:
        bar.close()
    outs = []
    for acc in sums:
        out = {}
        for name in reference:
            if name in acc:
                if uniform:
                    acc[name].div_(len(chosen))
                out[name] = acc.pop(name).to(out_dtypes[name])
            else:
                out[name] = newest[name]
        outs.append(out)
    return outs, changes


def _accumulate(sums: dict[str, Tensor], name: str, x: Tensor, weight: float | None, accumulate: torch.dtype) -> None:
    """``sums[name] += weight * x``; ``weight=None``: plain sum (fairseq's order: sum, then divide by the count)."""
    acc = sums.get(name)
    if acc is None:
        sums[name] = x.to(accumulate, copy=True) if weight is None else x.to(accumulate) * weight
    elif weight is None:
        acc.add_(x)
    elif weight != 0:
        acc.add_(x.to(accumulate) if x.dtype != accumulate else x, alpha=weight)


def _check_same(
    ck: RawCheckpoint, tensors: Mapping[str, Tensor], reference: dict, first: RawCheckpoint
) -> None:
    """Same names, shapes and kinds of tensor as the first checkpoint read."""
    if not reference:
        if not tensors:
            raise CheckpointSourceError(f"{WHERE}: {str(ck.path)!r} holds no tensors")
        reference.update({n: (tuple(x.shape), x.is_floating_point(), x.dtype) for n, x in tensors.items()})
        return
    missing, extra = sorted(set(reference) - set(tensors)), sorted(set(tensors) - set(reference))
    if missing or extra:
        raise CheckpointSourceError(
            f"{WHERE}: {str(ck.path)!r} holds other tensors than {str(first.path)!r}: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, extra {extra[:5]}{'...' if len(extra) > 5 else ''} "
            f"(a different model, or the wrong key=)"
        )
    for name, x in tensors.items():
        shape, is_float, _ = reference[name]
        if tuple(x.shape) != shape or x.is_floating_point() != is_float:
            raise CheckpointSourceError(
                f"{WHERE}: {name!r} is {x.dtype} {tuple(x.shape)} in {str(ck.path)!r} but "
                f"{reference[name][2]} {shape} in {str(first.path)!r} (checkpoints of different models?)"
            )


def _check_finite(ck: RawCheckpoint, name: str, x: Tensor) -> None:
    """NaN or Inf anywhere in ``x`` (min and max: a pass at memory speed that cannot overflow)."""
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x)
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        raise CheckpointSourceError(
            f"{WHERE}: {name!r} in {str(ck.path)!r} (t={ck.t:g}) holds NaN or Inf; an average of it would too. "
            f"Leave that checkpoint out (last= / steps= / the list of files)"
        )


def _sample(tensors: Mapping[str, Tensor]) -> Tensor:
    """A fixed subset of the floating elements (about :data:`SAMPLE`), in float64, the same for every checkpoint.

    Each tensor gives the same share of its elements, as up to 64 contiguous runs spread over
    it: a strided pick would touch every cache line of a large tensor, a pass over memory.
    """
    floats = [x.reshape(-1) for x in tensors.values() if x.is_floating_point()]
    total = sum(x.numel() for x in floats)
    share = min(1.0, SAMPLE / max(total, 1))
    parts = []
    for x in floats:
        want = max(1, round(x.numel() * share))
        runs = min(64, want)
        starts = torch.arange(runs) * (x.numel() // runs)
        index = (starts[:, None] + torch.arange(want // runs)).reshape(-1)
        parts.append(x[index].double())
    return torch.cat(parts)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(progress: Callable[[int], Any] | bool, total: int):
    if progress is True:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return _NoBar()
        return tqdm(total=total, unit="ckpt", desc="averaging", disable=None, leave=False)  # off when not a terminal
    return _NoBar()


@_collector.paused()
def save_average(averaged: Averaged, path: str | Path, *, key: str | None = None, trust: bool = False) -> Path:
    """Write ``averaged.state_dict`` to ``path`` atomically; returns the path.

    ``.safetensors``: a safetensors file (the target and the checkpoints used in its
    metadata). Any other name: ``torch.save`` of the state dict, or, when the newest
    checkpoint used is a ``torch.save`` file that nests it (a Lightning ``.ckpt``, a
    ``{"model": ...}`` file), that checkpoint with the weights replaced (its own names kept),
    so the average loads wherever the checkpoint did.
    """
    from .._engine.model import normalize_name
    from .._files.atomic import write_then_rename
    from .raw_files import state_dict_of, torch_load

    path = Path(path)
    sd = {k: v.contiguous() for k, v in averaged.state_dict.items()}
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise ImportError(f"{WHERE}: writing {str(path)!r} needs safetensors: pip install 'emakit[safetensors]'") from None
        meta = {"emakit_average": averaged.target, "emakit_checkpoints": ",".join(p for p, _, _ in averaged.used)}
        write_then_rename([(path, lambda tmp: save_file(sd, str(tmp), metadata=meta))])
        return path
    payload: Any = sd
    newest = Path(averaged.used[-1][0])
    if newest.is_file() and newest.suffix != ".safetensors":
        container = torch_load(newest, trust)
        inner = state_dict_of(newest, container, key)
        if inner is not container:
            for name in list(inner):
                inner[name] = sd[normalize_name(str(name))]
            payload = container
    write_then_rename([(path, lambda tmp: torch.save(payload, tmp))])
    return path
