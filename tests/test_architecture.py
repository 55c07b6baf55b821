"""The package's layering: no import cycles, and every module imports only from layers below it.

The graph is read from the source (every ``import`` statement, also those inside functions,
which run later but still tie the modules together), not from ``sys.modules``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "emakit"

#: Layer of every module; a module may import only from lower layers. The README's
#: architecture map (Development) describes the same layers.
LAYERS: dict[str, int] = {
    # pure helpers: math, names, time, file writes, tensor kernels
    "schedules": 0,
    "kernels": 0,
    "_engine.model": 0,
    "_engine.clock": 0,
    "_files.atomic": 0,
    "_posthoc.profiles": 0,
    "_files.compact": 0,
    "_peers.schedules": 1,
    "_files.header": 1,
    "_posthoc.sweep": 1,
    "_peers.options": 2,
    "_peers.formats": 1,
    "_peers.checkpoints": 2,
    # process groups, DTensors, engines; DCP files; the contiguous-parameters helper
    "distributed": 1,
    "contiguous": 1,
    "_files.dcp": 2,
    "_files.shards": 2,
    # the averager's rooms
    "_engine.storage": 2,
    "_engine.binding": 3,
    "_engine.update": 4,
    "_engine.swap": 4,
    "_engine.module_view": 4,
    "snapshots": 3,
    "_engine.checkpoint": 3,
    "_engine.averager": 5,
    # what users see
    "ema": 6,
    "power": 6,
    "verify": 6,
    "planning": 6,
    "migrate": 7,
    "lightning": 7,
    "_posthoc.shard_reader": 4,
    "posthoc": 5,
    # tools on top
    "__init__": 8,
    # the subsystem folders' own __init__ files hold a docstring only
    "_engine.__init__": 0,
    "_files.__init__": 0,
    "_posthoc.__init__": 0,
    "_peers.__init__": 0,
    "_cli.__init__": 0,
    "recipes.__init__": 9,
    "recipes.diffusion": 9,
    "_cli.demo": 10,
    "_cli.args": 10,
    "cli": 11,
    "__main__": 12,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        out[".".join(rel.parts)] = path
    return out


def _from_targets(base: str, names: list[str], known: set[str]) -> list[str]:
    """Modules that ``from <base> import <names>`` depends on (``base`` relative to emakit, "" for it).

    ``base`` itself when it is a module; for a package, each name that is a submodule
    (``from . import posthoc``), and the package's ``__init__`` for any other name
    (``from . import __version__``).
    """
    if base in known:
        return [base]
    init = f"{base}.__init__" if base else "__init__"
    out = []
    for name in names:
        sub = f"{base}.{name}" if base else name
        out.append(sub if sub in known else init)
    return out


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of the package it imports`` (names relative to ``emakit``)."""
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            names = [a.name for a in getattr(node, "names", [])]
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                parts = package[: len(package) - (node.level - 1)]
                base = ".".join([*parts, *((node.module or "").split(".") if node.module else [])])
                targets = _from_targets(base, names, known)
            elif isinstance(node, ast.ImportFrom) and (node.module == "emakit" or (node.module or "").startswith("emakit.")):
                targets = _from_targets(node.module.removeprefix("emakit").lstrip("."), names, known)
            elif isinstance(node, ast.Import):
                for name in names:
                    if name == "emakit" or name.startswith("emakit."):
                        sub = name.removeprefix("emakit").lstrip(".")
                        targets.append(sub if sub in known else (f"{sub}.__init__" if sub else "__init__"))
            graph[module].update(t for t in targets if t in known and t != module)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_top_level_and_function_level_imports():
    graph = import_graph()
    assert "snapshots" in graph["posthoc"]  # from .snapshots import ...
    assert "_posthoc.shard_reader" in graph["posthoc"]  # inside reconstruct()
    assert "_cli.demo" in graph["cli"]  # from . import demo, inside a function
    assert "__init__" in graph["recipes.diffusion"]  # import emakit
    assert "snapshots" in graph["recipes.diffusion"]  # from emakit import snapshots


def test_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_imports_only_from_lower_layers():
    graph = import_graph()
    assert set(graph) == set(LAYERS), f"place new modules in LAYERS: {sorted(set(graph) ^ set(LAYERS))}"
    upward = [
        f"{m} (layer {LAYERS[m]}) imports {t} (layer {LAYERS[t]})"
        for m, targets in graph.items()
        for t in targets
        if LAYERS[t] >= LAYERS[m]
    ]
    assert not upward, "\n".join(upward)


def test_readme_architecture_map_matches_the_layers():
    readme = (PACKAGE.parents[1] / "README.md").read_text()
    table = readme.split("### Architecture", 1)[1].split("\n\n", 2)[2]
    seen = set()
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0][:1].isdigit():
            continue
        layer = int(cells[0].rstrip("+"))
        for name in re.findall(r"`([\w/]+)\.py`", cells[1]):
            module = name.replace("/", ".")
            seen.add(module)
            if cells[0].endswith("+"):
                assert LAYERS[module] >= layer, module
            else:
                assert LAYERS[module] == layer, f"README puts {module} in layer {layer}, LAYERS in {LAYERS[module]}"
    assert seen >= {m for m in LAYERS if not m.startswith("recipes")}, sorted(set(LAYERS) - seen)
