"""_lightning: the pieces of :mod:`emakit.lightning` (Lightning itself, the callback's hooks, its checkpoints)."""
