"""Doctests run over src/: skip the modules whose optional dependency is not installed."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("lightning") else ["src/emakit/lightning.py"]
