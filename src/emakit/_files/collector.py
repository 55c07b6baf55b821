"""Python's cyclic garbage collector, paused while emakit reads or writes a model's tensors.

A full collection visits every object the process tracks: ~165k after ``import torch``
(71 ms on this project's 2-core machine), more in a training script. Reading or writing a
model of thousands of tensors allocates enough headers, plans and tensors to start one
every ~60k objects that outlive a young collection, each finding nothing to free: for a
model of 2000 tensors, half of a reconstruction from fp32 snapshots and of an fp32 snapshot
save, a quarter of a DCP save or load (``benchmarks/bench_collector.py``). emakit creates no
reference cycles there; its objects are freed by reference counting as before.

:func:`paused` stops automatic collection for the length of one call and restores it after
(also when it raises). Calls on several threads, or nested, share one pause: collection
resumes when the last one returns, if it was enabled when the first one began. A cycle
that another thread makes meanwhile waits for the first collection after that. Imports no
other emakit module.

    @paused()
    def reconstruct(...): ...
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

#: Whether :func:`paused` pauses: ``benchmarks/bench_collector.py`` turns it off to measure what it saves.
ENABLED = True

_lock = threading.Lock()
_depth = 0  # calls inside a pause now, on any thread
_resume = False  # whether collection was enabled when the outermost of them began


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Pause automatic garbage collection inside the ``with`` block (or the decorated function)."""
    global _depth, _resume
    if not ENABLED:
        yield
        return
    with _lock:
        if _depth == 0:
            _resume = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _resume:
                gc.enable()
