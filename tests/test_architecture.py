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
    # pure helpers: math, names, time, atomic writes, tensor kernels, process groups
    "schedules": 0,
    "kernels": 0,
    "distributed": 0,
    "_engine.model": 0,
    "_engine.clock": 0,
    "_files.atomic": 0,
    "_files.limits": 0,
    "_files.streams": 0,
    "_files.collector": 0,
    "_files.compact": 1,
    "_files.checksums": 0,
    "_posthoc.profiles": 0,
    "_peers.reading": 0,
    "_peers.formats": 1,
    "_lightning.pl": 0,
    "_cli.args": 0,
    "contiguous": 1,
    # what files hold: DCP directories, the snapshot header, shard files, snapshot reading and writing
    "_files.dcp": 1,
    "_files.header": 1,
    "_files.shards": 2,
    "_files.read_ahead": 2,
    "_files.decoded": 2,
    "_files.snapshot_read": 3,
    "_files.snapshot_write": 4,
    "snapshots": 5,
    "_files.snapshot_check": 6,
    # the averager's rooms
    "_engine.storage": 1,
    "_engine.nonfinite": 1,
    "_engine.binding": 2,
    "_engine.checkpoint": 2,
    "_engine.frozen": 2,
    "_engine.module_view": 2,
    "_engine.options": 2,
    "_engine.swap": 3,
    "_engine.update": 3,
    "_engine.averager": 4,
    # what users see
    "ema": 5,
    "power": 6,
    # other libraries' rules, formats and options
    "_peers.schedules": 1,
    "_peers.trainers": 2,
    "_peers.checkpoints": 3,
    "_peers.options": 2,
    "migrate": 6,
    # post-hoc EMA: from snapshots (solve, stream, shard reader), from raw checkpoints, the sweep
    "_posthoc.raw_files": 1,
    "_posthoc.raw_weights": 1,
    "_posthoc.sweep": 1,
    "_posthoc.average": 2,
    "_posthoc.raw_sweep": 3,
    "_posthoc.shard_reader": 6,
    "_posthoc.solve": 6,
    "_posthoc.stream": 6,
    "posthoc": 7,
    "_planning.fit": 7,
    "_planning.layout": 8,
    "_planning.pruning": 8,
    "planning": 9,
    "verify": 8,
    # integrations
    "_lightning.checkpoints": 1,
    "_lightning.callback": 7,
    "lightning": 8,
    # tools on top
    "__init__": 8,
    "recipes.__init__": 0,
    "recipes.diffusion_model": 0,
    "recipes.digits": 0,
    "recipes.run_dir": 6,
    "recipes.diffusion": 9,
    "_cli.demo": 10,
    "_cli.average": 10,
    "_cli.demo_raw": 9,
    "_cli.commands": 11,
    "cli": 12,
    "__main__": 13,
    # the subsystem folders' own __init__ files hold a docstring only
    "_engine.__init__": 0,
    "_files.__init__": 0,
    "_posthoc.__init__": 0,
    "_peers.__init__": 0,
    "_planning.__init__": 0,
    "_lightning.__init__": 0,
    "_cli.__init__": 0,
}

#: The package's front door: the public modules at the top of ``src/emakit`` (besides them, only
#: the subsystem folders, whose names start with ``_``, and the public ``recipes`` package).
PUBLIC = {
    "__init__", "__main__", "cli", "contiguous", "distributed", "ema", "kernels", "lightning", "migrate",
    "planning", "posthoc", "power", "schedules", "snapshots", "verify",
}  # fmt: skip
SUBSYSTEMS = {"_engine", "_files", "_posthoc", "_peers", "_planning", "_lightning", "_cli", "recipes"}

#: The size guides (style.md): lines per file, class and function; the recipe's loop and the
#: demo's run read top to bottom and may be longer.
MAX_FILE, MAX_CLASS, MAX_FUNCTION = 450, 250, 60
LONG_ON_PURPOSE = {"recipes/diffusion.py:train", "_cli/demo.py:run"}


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
            names = [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
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
    assert "_cli.demo" in graph["_cli.commands"]  # from . import demo, inside a function
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
    wanted = {m for m in LAYERS if not m.startswith("recipes") and not m.endswith(".__init__")}
    assert seen >= wanted, sorted(wanted - seen)


def test_top_level_holds_the_public_modules_and_the_subsystem_folders_only():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == PUBLIC, f"new top-level modules belong in a subsystem folder: {sorted(top ^ PUBLIC)}"
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == SUBSYSTEMS, sorted(folders ^ SUBSYSTEMS)
    for folder in SUBSYSTEMS - {"recipes"}:
        init = ast.parse((PACKAGE / folder / "__init__.py").read_text())
        assert ast.get_docstring(init) and len(init.body) == 1, f"{folder}/__init__.py: a docstring only"


def test_files_classes_and_functions_stay_within_the_size_guides():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE:
            too_long.append(f"{rel}: {len(text.splitlines())} lines (file)")
        for node in ast.walk(ast.parse(text)):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef) and size > MAX_CLASS:
                too_long.append(f"{rel}: class {node.name} {size} lines")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and size > MAX_FUNCTION:
                if f"{rel}:{node.name}" not in LONG_ON_PURPOSE:
                    too_long.append(f"{rel}: {node.name}() {size} lines")
    assert not too_long, "\n".join(too_long)
