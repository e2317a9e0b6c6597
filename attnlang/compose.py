"""Composition of variants' masks: ``a & b``, ``a | b``, ``~a`` (JAX Splash attention's mask combinators).

The composed variant is compiled from text, so it prints, configures and pickles like any other: the parts'
bindings come first (a name a part binds that means something else in another part is renamed), then the parts'
results combined. Parameters merge by name; tensors merge by name at call time. Variant's ``&``, ``|`` and ``~``
call ``compose_masks`` with each part's mask text, params and score, and compile the result.
"""

from __future__ import annotations

import re
from typing import Mapping

from .ast import Let, Reduce, names_used, walk
from .errors import AttnLangError
from .parse import parse

__all__ = ["compose_masks"]

_OPS = {"and": "&", "or": "|"}


def _split(text: str):
    """(bindings as [(name, value text)], result text) of an expression's source."""
    tree = parse(text, where="mask")
    if not isinstance(tree, Let):
        return [], text.strip()
    bindings = []
    for b in tree.bindings:
        piece = text[b.span.end:b.end]  # '= value ;' or '= value \n'
        value = piece.strip()
        value = value[:-1] if value.endswith(";") else value
        bindings.append((b.name, value.strip()[1:].strip()))
    return bindings, text[tree.bindings[-1].end:].strip()


def _rename(text: str, old: str, new: str) -> str:
    # identifiers only: not inside a longer name, nor a number such as 1e5
    return re.sub(rf"(?<![A-Za-z0-9_.]){re.escape(old)}(?![A-Za-z0-9_])", new, text)


def compose_masks(op: str, parts: list[Mapping]) -> tuple[str, dict]:
    """The mask text and params of the variant whose mask is the parts' masks combined by ``op`` ("and", "or" or
    "not"; "not" takes one part). Each part: {"mask": source text, "params": dict, "score": the score as written,
    "plain": whether its canonical score is ``score`` with nothing else (no lse shift, sink or normalize=False),
    optionally "why": what makes it not plain, for the message}.

    Raises:
        AttnLangError: a part that is not plain, or two parts that give one parameter different values.
    """
    what = {"and": "'&'", "or": "'|'", "not": "'~'"}[op]
    for p in parts:
        if not p["plain"]:
            raise AttnLangError(f"{what} composes masks only: each variant's score must be 'score' (and no sink or "
                                f"normalize=False), but one has {p.get('why') or 'score ' + repr(p['score'])}")
    params: dict = {}
    for p in parts:
        for name, value in p["params"].items():
            if name in params and (type(params[name]) is not type(value) or params[name] != value):
                raise AttnLangError(f"{what} cannot merge parameter {name!r}: one variant gives {params[name]!r}, "
                                    f"the other {value!r}")
            params[name] = value
    names = [_all_names(p["mask"]) for p in parts]
    taken = set(params).union(*names)
    lines: list[str] = []
    results: list[str] = []
    for i, p in enumerate(parts):
        text = p["mask"]
        tree = parse(text, where="mask")
        local = {n.var for n in walk(tree) if isinstance(n, Reduce)} | {
            b.name for n in walk(tree) if isinstance(n, Let) for b in n.bindings}
        others = set(params).union(*(names[j] for j in range(len(parts)) if j != i))
        for name in sorted(local & others):  # a name bound here that means something else in another part
            k = 2
            while f"{name}_{k}" in taken:
                k += 1
            taken.add(f"{name}_{k}")
            text = _rename(text, name, f"{name}_{k}")
        bindings, result = _split(text)
        lines.extend(f"{name} = {value}" for name, value in bindings)
        results.append(result)
    if op == "not":
        body = f"~({results[0]})"
    else:
        body = f" {_OPS[op]} ".join(f"({r})" for r in results)
    return "\n".join(lines + [body]), params


def _all_names(text: str) -> set[str]:
    """Every identifier a source mentions (bound names and generator variables included)."""
    tree = parse(text, where="mask")
    out = names_used(tree)
    for n in walk(tree):
        if isinstance(n, Reduce):
            out.add(n.var)
        elif isinstance(n, Let):
            out |= {b.name for b in n.bindings}
    return out
