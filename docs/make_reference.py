"""Writes docs/reference.md: every public name of emakit with its signature and docstring.

The reference is read from the source (``__all__`` of each public module, then the
definitions), so optional integrations are documented without installing them.

    python docs/make_reference.py            # rewrite docs/reference.md
    python docs/make_reference.py --check    # exit 1 if docs/reference.md is out of date
"""

from __future__ import annotations

import argparse
import ast
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "emakit"
OUT = ROOT / "docs" / "reference.md"

#: Public modules, in the order they are documented (the optional integrations last).
MODULES = ["emakit", "schedules", "posthoc", "planning", "snapshots", "migrate", "distributed", "kernels", "lightning"]


def _tree(module: str) -> ast.Module:
    """The source of ``module`` (dotted, relative to emakit: ``"posthoc"``, ``"_engine.options"``)."""
    path = PACKAGE / ("__init__.py" if module == "emakit" else module.replace(".", "/") + ".py")
    return ast.parse(path.read_text())


def _resolve(module: str, level: int, name: str | None) -> str:
    """The module a relative ``from <dots><name> import`` in ``module`` names (dotted, relative to emakit)."""
    package = [] if module == "emakit" else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, *([name] if name else [])])


def public_names(module: str) -> list[str]:
    """``__all__`` of a public module (its literal list in the source)."""
    for node in _tree(module).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return [ast.literal_eval(e) for e in node.value.elts]
    raise ValueError(f"emakit.{module} has no __all__")


def _definition(module: str, name: str) -> tuple[str, ast.AST | None]:
    """``(module that defines name, its node)``, following ``from .x import name`` re-exports."""
    tree = _tree(module)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return module, node
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return module, node
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == name:
            return module, node
        if isinstance(node, ast.ImportFrom) and node.level >= 1 and any(a.name == name for a in node.names):
            if node.module is None:
                return name, None  # a submodule (``from . import posthoc``)
            return _definition(_resolve(module, node.level, node.module), name)
    raise ValueError(f"emakit.{module}.{name} is listed in __all__ but not defined")


def _signature(node: ast.FunctionDef) -> str:
    args = ast.unparse(node.args)
    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    return f"{node.name}({args}){returns}"


def _doc(node: ast.AST) -> str:
    return inspect.cleandoc(ast.get_docstring(node, clean=False) or "") if node is not None else ""


#: Methods that implement a framework's interface (Lightning's Callback hooks): listed by name,
#: documented by the framework.
HOOKS = {"setup", "teardown", "state_dict", "load_state_dict", "state_key"}


def _is_hook(node: ast.ClassDef, module: str, method: ast.FunctionDef) -> bool:
    """A framework hook: an ``on_*`` / HOOKS method of a class whose base comes from outside emakit."""
    external = any(_external_base(module, b) for b in node.bases)
    return external and (method.name.startswith("on_") or method.name in HOOKS) and not _doc(method)


def _external_base(module: str, base: ast.expr) -> bool:
    """Whether ``base`` is, or derives from, a class from outside emakit."""
    if not isinstance(base, ast.Name):
        return True
    try:
        where, node = _definition(module, base.id)
    except ValueError:
        return True
    return isinstance(node, ast.ClassDef) and any(_external_base(where, b) for b in node.bases)


def _public_methods(node: ast.ClassDef, module: str, hooks: bool = False) -> list[ast.FunctionDef]:
    """Public methods of a class, its own first, then those it inherits from classes of the package.

    Framework hooks are left out unless ``hooks``.
    """
    out = [
        item
        for item in node.body
        if isinstance(item, ast.FunctionDef)
        and not item.name.startswith("_")
        and (hooks or not _is_hook(node, module, item))
    ]
    seen = {m.name for m in out}
    for base in node.bases:
        if not isinstance(base, ast.Name):
            continue
        try:
            where, base_node = _definition(module, base.id)
        except (ValueError, FileNotFoundError):
            continue  # a class from torch or the standard library
        if isinstance(base_node, ast.ClassDef):
            for method in _public_methods(base_node, where):
                if method.name not in seen:
                    seen.add(method.name)
                    out.append(method)
    return out


def render() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `python docs/make_reference.py`; do not edit by hand",
        "(`tests/test_reference.py` fails when it is out of date or a public name has no docstring).",
        "",
    ]
    for module in MODULES:
        title = "emakit" if module == "emakit" else f"emakit.{module}"
        lines += [f"## `{title}`", ""]
        doc = _doc(_tree(module))
        if doc:
            lines += [doc.split("\n\n")[0], ""]
        for name in public_names(module):
            if name == "__version__":
                continue
            where, node = _definition(module, name)
            if node is None:
                lines += [f"### `{title}.{name}`", "", f"The module `emakit.{where}` (below).", ""]
                continue
            if isinstance(node, ast.FunctionDef):
                lines += [f"### `{title}.{_signature(node)}`", "", _doc(node), ""]
            elif isinstance(node, ast.ClassDef):
                lines += [f"### class `{title}.{name}`", "", _doc(node), ""]
                for method in _public_methods(node, where):
                    lines += [f"#### `{name}.{_signature(method)}`", "", _doc(method), ""]
                hooks = [m.name for m in _public_methods(node, where, hooks=True) if _is_hook(node, where, m)]
                if hooks:
                    lines += [f"Framework hooks it implements: {', '.join(f'`{h}`' for h in hooks)}.", ""]
            else:
                lines += [f"### `{title}.{name}`", "", f"A constant: `{ast.unparse(node.value)}`.", ""]
    return "\n".join(lines).rstrip() + "\n"


def missing_docstrings() -> list[str]:
    """Public names (and public methods of public classes) without a docstring."""
    out = []
    for module in MODULES:
        title = "emakit" if module == "emakit" else f"emakit.{module}"
        for name in public_names(module):
            if name == "__version__":
                continue
            where, node = _definition(module, name)
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not _doc(node):
                out.append(f"{title}.{name}")
            if isinstance(node, ast.ClassDef):
                out += [f"{title}.{name}.{m.name}" for m in _public_methods(node, where) if not _doc(m)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/reference.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print("docs/reference.md is out of date: run python docs/make_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
