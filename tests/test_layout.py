"""The repository's layout as installed: every backend module imports as ``attnlang.backends.<name>`` and the
grammar is read from the installed package (``attnlang.grammar``), not from a path beside the sources."""
from __future__ import annotations

import importlib
import pkgutil
from importlib import resources

import attnlang.backends
from attnlang.parse import parse


def test_every_backend_module_imports():
    names = sorted(m.name for m in pkgutil.iter_modules(attnlang.backends.__path__))
    assert {"eager", "flex", "fa4"} <= set(names)
    for name in names:
        module = importlib.import_module(f"attnlang.backends.{name}")
        assert module.__name__ == f"attnlang.backends.{name}"


def test_grammar_ships_in_the_package():
    text = resources.files("attnlang.grammar").joinpath("attnlang.lark").read_text()
    assert "start" in text or "?" in text
    assert parse("q_idx >= kv_idx") is not None
