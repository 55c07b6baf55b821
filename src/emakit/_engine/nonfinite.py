"""Non-finite averages: the error, the check made whenever the averages are used (a mixin of the averager), and
:func:`all_finite`, the test of one tensor that readers of stored tensors share.

Uses the averager's ``_owner``, ``_storage``, ``_nonfinite_marks``, ``num_updates`` and ``t``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import distributed


def all_finite(x: Tensor) -> bool:
    """Whether every element of a floating tensor is finite: a sum is NaN/Inf when an element is (30x faster than
    ``isfinite``), and a sum that overflowed while every element is finite is confirmed element by element."""
    return math.isfinite(float(x.sum())) or bool(torch.isfinite(x).all())


class NonFiniteError(ValueError):
    """An average holds NaN or Inf: a non-finite weight entered it (see ``skip_nonfinite``)."""


class NonFiniteChecks:
    """Raises :class:`NonFiniteError` when an average is read, swapped, saved or snapshotted while non-finite."""

    def _check_finite(self, what: str, collective: bool = False) -> None:
        """Raise :class:`NonFiniteError` if an average holds NaN or Inf; one host sync per device.

        Runs when the averages are read, swapped, saved or snapshotted, never per update: NaN
        or Inf that entered an average stays there, so checking at use loses nothing but the
        exact update, which the error brackets (finite when last checked, non-finite now).
        ``collective`` (for calls every rank makes: ``save``, sharded snapshots, gathering):
        with sharded averages every rank raises when any rank's shard is non-finite, so no rank
        is left waiting in the collective write.
        """
        bad = self._storage.first_nonfinite()
        where = repr(bad)
        if collective and self._storage.is_sharded and distributed.any_rank(bad is not None) and bad is None:
            bad, where = "", "a shard held by another rank"
        if bad is None:
            self._finite_at = (self.num_updates, self.t)
            self._nonfinite_marks.clear()  # (a load may have replaced a non-finite average)
            return
        located = [tuple(m.tolist()) for m in self._nonfinite_marks.values()]
        located = min((m for m in located if m[0] >= 0), default=None)
        if located is not None:
            when = f"at update {int(located[0])} (t={located[1]:g}; locate_nonfinite=True marked it)"
        else:
            updates, t = getattr(self, "_finite_at", (0, 0))
            when = (
                f"after update {updates} (t={t:g}, when the averages were last checked and finite) and by update "
                f"{self.num_updates} (t={self.t:g}; locate_nonfinite=True would name the exact update)"
            )
        raise NonFiniteError(
            f"{self._owner}.{what}: the average of {where} holds NaN or Inf: a non-finite weight entered it "
            f"{when}. Find the step that made the weights non-finite; resume from a checkpoint (load() / "
            f"load_state_dict()); skip_nonfinite=True skips such updates instead"
        )
