"""docs/reference.md is generated from the docstrings and kept true: every public name documented."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _maker():
    spec = importlib.util.spec_from_file_location("make_reference", ROOT / "docs" / "make_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_reference = _maker()


def test_every_public_name_has_a_docstring():
    assert make_reference.missing_docstrings() == []


def test_reference_is_up_to_date():
    text = (ROOT / "docs" / "reference.md").read_text()
    assert text == make_reference.render(), "docs/reference.md is out of date: run python docs/make_reference.py"


def test_every_public_name_is_in_the_reference():
    text = (ROOT / "docs" / "reference.md").read_text()
    for module in make_reference.MODULES:
        title = "emakit" if module == "emakit" else f"emakit.{module}"
        assert f"## `{title}`" in text
        for name in make_reference.public_names(module):
            if name != "__version__":
                assert f"{title}.{name}" in text, f"{title}.{name}"


def test_a_name_without_a_docstring_is_reported(tmp_path, monkeypatch):
    # The check can fail: a module with an undocumented public function is caught.
    package = tmp_path / "src" / "emakit"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""Pkg."""\n__all__ = ["f"]\n\n\ndef f():\n    pass\n')
    monkeypatch.setattr(make_reference, "PACKAGE", package)
    monkeypatch.setattr(make_reference, "MODULES", ["emakit"])
    assert make_reference.missing_docstrings() == ["emakit.f"]
