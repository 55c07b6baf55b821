"""Time and decay of one update: host-side checks on plain numbers, no tensors.

Owns the rules for ``t`` / ``dt`` (one unit by default, strictly increasing, finite) and the
check that a schedule returned a decay in ``[0, 1]``. Knows nothing about models, storage
or files.
"""

from __future__ import annotations

import math
from typing import Any


def next_time(owner: str, now: float, t: float | None, dt: float | None) -> tuple[float, float]:
    """The ``(t, dt)`` of the next update from ``t`` and/or ``dt``; one step when neither is given."""
    for label, value in (("t", t), ("dt", dt)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"{owner}.update: {label} must be a number, got {label}={value!r}")
    if t is None:
        dt = 1 if dt is None else dt
        if not dt > 0 or math.isinf(dt):
            raise ValueError(f"{owner}.update: dt must be a finite number > 0, got dt={dt}")
        return now + dt, dt
    if not t > now or math.isinf(t):
        raise ValueError(f"{owner}.update: t must be finite and later than the current time {now}, got t={t}")
    if dt is not None and not math.isclose(now + dt, t, rel_tol=1e-12, abs_tol=1e-12):
        raise ValueError(
            f"{owner}.update: t and dt disagree: the current time is {now}, so t={t} means dt={t - now}, got dt={dt}"
        )
    return t, t - now


def check_decay(owner: str, schedule: Any, t: float, dt: float) -> float:
    """``schedule(t, dt)`` as a float, or an error naming the schedule and the value."""
    decay = schedule(t, dt)
    try:
        decay = float(decay)
    except (TypeError, ValueError):
        raise TypeError(
            f"{owner}: schedule {schedule!r} returned {decay!r} at t={t}, dt={dt}; expected a float decay in [0, 1]"
        ) from None
    if not 0.0 <= decay <= 1.0:
        raise ValueError(
            f"{owner}: schedule {schedule!r} returned decay={decay} at t={t}, dt={dt}; expected a value in [0, 1]"
        )
    return decay


def check_time(where: str, t: Any) -> float:
    """``t`` if it is a finite number >= 0 (a stored or given time), else a ValueError naming ``where``."""
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise ValueError(f"{where}: t must be a finite number >= 0, got t={t!r}")
    return t
