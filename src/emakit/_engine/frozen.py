"""Frozen parameters that become trainable: averaged from that moment on (a mixin of the averager).

A frozen parameter (``requires_grad=False``) takes no memory in the averages: it is read from
the model when needed. When training unfreezes it, :meth:`FrozenParameters._promote` adds it
to the storage, every profile starting at its value then (the average of a constant is that
constant). Uses the averager's ``_frozen``, ``_slots``, ``_spec``, ``_storage``, ``_dtype``,
``_device``, ``_is_param`` and ``_set_storage``.
"""

from __future__ import annotations

import weakref

from torch.optim.optimizer import register_optimizer_step_pre_hook

from .storage import default_placement


class FrozenParameters:
    """Watches the frozen parameters and starts averaging those that became trainable."""

    def _watch_frozen(self) -> None:
        """Look for frozen parameters that became trainable just before every optimizer step.

        A parameter unfrozen in the training loop is stepped by the optimizer before the next
        ``update()``; its average so far is its value *before* that step (the average of a
        constant is that constant), so it must be taken then: a step pre-hook of every
        ``torch.optim`` optimizer does it, one attribute read per frozen parameter and no
        host synchronisation. ``update()`` checks too when no optimizer step ran since the
        last update (other optimizers, hand-written steps): then the average starts from the
        value the parameter has at that update. The hook is removed once nothing is frozen
        or when this object is garbage collected.
        """
        self._checked_frozen = False
        hook = getattr(self, "_frozen_hook", None)
        if self._frozen and hook is None:
            ref = weakref.ref(self)

            def before_step(optimizer, args, kwargs) -> None:
                averager = ref()
                if averager is not None:
                    averager._promote_unfrozen()
                    averager._checked_frozen = True

            handle = register_optimizer_step_pre_hook(before_step)
            self._frozen_hook = weakref.finalize(self, handle.remove)
        elif not self._frozen and hook is not None:
            hook()  # removes the hook
            self._frozen_hook = None

    def _promote_unfrozen(self) -> None:
        for _, table, attr in self._frozen:
            if table[attr].requires_grad:
                self._promote([n for n, tbl, a in self._frozen if tbl[a].requires_grad])
                return

    def _promote(self, names: list[str]) -> None:
        """Average ``names`` from now on: frozen parameters that became trainable.

        Every profile starts at the parameter's current value, which is exactly its average so
        far: the average of a constant is that constant.
        """
        if not names:
            return
        tensors = {n: self._slots[n].get() for n in names}
        self._storage.add(names, tensors, self._is_param, default_placement(self._dtype, self._device))
        for n in names:
            self._spec.live.remove(n)
            self._spec.frozen.remove(n)
            self._spec.average.append(n)
        self._set_storage(self._storage)  # new groups: bindings are made again
