"""Imports run one way, from the user-facing Variant down to the stages (grammar -> parse -> ast -> check ->
simplify -> analyse -> backend): no import cycle among attnlang's modules, counting imports inside functions
(``if TYPE_CHECKING:`` blocks aside), and no lower stage imports ``attnlang.variant``.

The source is read with ``ast`` (nothing is imported), with the package-dir mapping of pyproject.toml, so
``backends/`` is ``attnlang.backends`` and ``grammar/`` is ``attnlang.grammar``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "attnlang"

# The user-facing layers, which compose Variants and so may import attnlang.variant. Everything else is a stage
# below Variant and takes what it needs as arguments (expressions, tensors, sizes, a CallPlan).
TOP_LAYERS = {
    "attnlang",               # the package: re-exports Variant, compile, ...
    "attnlang.__main__",
    "attnlang.cli",
    "attnlang.variant",
    "attnlang.testing",       # strategies and assertions over Variants, for users' test suites
    "attnlang.distributed",   # API.md: ald.attention(v, ...) takes a Variant
}
TOP_PREFIXES = ("attnlang.integrations.", "attnlang.examples.")


def _package_dirs() -> dict[str, Path]:
    """package name -> folder, from pyproject.toml's [tool.setuptools] packages and package-dir."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = config.get("package-dir", {})
    out = {}
    for name in config["packages"]:
        if name in mapping:
            out[name] = ROOT / mapping[name]
        else:
            parent = name.rpartition(".")[0]
            base = out.get(parent, ROOT / parent.replace(".", "/")) if parent else ROOT
            out[name] = base / name.rpartition(".")[2] if parent else ROOT / name
    return out


def modules() -> dict[str, tuple[Path, bool]]:
    """module name -> (source file, is a package __init__)."""
    out = {}
    for package, folder in _package_dirs().items():
        for path in sorted(folder.glob("*.py")):
            if path.stem == "__init__":
                out[package] = (path, True)
            else:
                out[f"{package}.{path.stem}"] = (path, False)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom in the tree, in functions too, skipping ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(module: str, is_package: bool, node, known) -> set[str]:
    """The attnlang modules an import statement loads (a module, or for ``from X import name`` the submodule
    X.name when there is one, else X)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
        return {_deepest(t, known) for t in targets if t.split(".")[0] == PACKAGE} - {None}
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        origin = ".".join(base + ([node.module] if node.module else []))
    else:
        origin = node.module or ""
    if origin.split(".")[0] != PACKAGE:
        return set()
    out = set()
    for alias in node.names:
        sub = f"{origin}.{alias.name}"
        got = sub if sub in known else _deepest(origin, known)
        if got is not None:
            out.add(got)
    return out


def _deepest(name: str, known) -> str | None:
    parts = name.split(".")
    while parts:
        if ".".join(parts) in known:
            return ".".join(parts)
        parts.pop()
    return None


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph = {}
    for name, (path, is_package) in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = set()
        for node in _import_nodes(tree):
            edges |= _resolve(name, is_package, node, known)
        graph[name] = edges - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path, iters = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(graph.get(nxt, ()))))
    return None


def _is_top(module: str) -> bool:
    return module in TOP_LAYERS or module.startswith(TOP_PREFIXES)


def test_the_graph_sees_the_layout():
    graph = import_graph()
    assert {"attnlang.variant", "attnlang.sparsity", "attnlang.backends", "attnlang.backends.flex",
            "attnlang.grammar"} <= set(graph)
    assert "attnlang.plan" in graph["attnlang.backends.flex"]            # relative import from backends/
    assert "attnlang.backends" in graph["attnlang.variant"]              # an import inside a method
    assert "attnlang.sparsity" in graph["attnlang.variant"]


def test_no_import_cycles():
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle among attnlang modules: " + " -> ".join(cycle)


def test_lower_stages_never_import_variant():
    bad = sorted(m for m, deps in import_graph().items() if "attnlang.variant" in deps and not _is_top(m))
    assert not bad, (f"{', '.join(bad)} import attnlang.variant; lower stages take what they need as arguments "
                     f"(expressions, tensors, sizes, a CallPlan) and Variant composes them")


def test_the_checker_finds_cycles_and_resolves_relative_imports():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    known = {"attnlang": None, "attnlang.variant": None, "attnlang.backends": None, "attnlang.backends.fa4": None,
             "attnlang.sparsity": None, "attnlang.plan": None}
    rel = ast.parse("from ..sparsity import x\nfrom . import fa4\nfrom .. import variant").body
    assert _resolve("attnlang.backends.flex", False, rel[0], known) == {"attnlang.sparsity"}
    assert _resolve("attnlang.backends.flex", False, rel[1], known) == {"attnlang.backends.fa4"}
    assert _resolve("attnlang.backends.flex", False, rel[2], known) == {"attnlang.variant"}
    assert _resolve("attnlang.backends", True, ast.parse("from ..plan import CallPlan").body[0], known) == {
        "attnlang.plan"}
    assert _resolve("attnlang.cli", False, ast.parse("import attnlang.backends.fa4").body[0], known) == {
        "attnlang.backends.fa4"}
    hidden = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .variant import Variant\n"
                       "def f():\n    from .variant import compile\n")
    got = [n.module for n in _import_nodes(hidden)]
    assert got.count("variant") == 1 and "typing" in got
