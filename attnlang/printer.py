"""The canonical printer: AST -> text with the fewest parentheses, so that ``parse(to_source(e)) == e``.

The canonical text is what a Variant hashes and compares, and what ``explain()`` shows.
"""

from __future__ import annotations

import math

from .ast import Binary, Call, Const, DType, Expr, Index, Op, Unary, Var, children, names_used

__all__ = ["to_source", "to_program", "precedence"]

# Loosest first, as in LANGUAGE.md.
_OR, _XOR, _AND, _NOT, _CMP, _SHIFT, _SUM, _PRODUCT, _NEG, _POW, _ATOM = range(1, 12)

_LEVEL = {
    Op.OR: _OR, Op.BITOR: _OR, Op.XOR: _XOR, Op.AND: _AND, Op.BITAND: _AND, Op.NOT: _NOT,
    Op.LT: _CMP, Op.LE: _CMP, Op.GT: _CMP, Op.GE: _CMP, Op.EQ: _CMP, Op.NE: _CMP,
    Op.LSHIFT: _SHIFT, Op.RSHIFT: _SHIFT,
    Op.ADD: _SUM, Op.SUB: _SUM,
    Op.MUL: _PRODUCT, Op.TRUEDIV: _PRODUCT, Op.FLOORDIV: _PRODUCT, Op.MOD: _PRODUCT,
    Op.NEG: _NEG, Op.POW: _POW,
}

_SPELLING = {Op.AND: "&", Op.OR: "|", Op.NOT: "~", Op.NEG: "-", Op.BITAND: "&", Op.BITOR: "|"}


def precedence(node: Expr) -> int:
    if isinstance(node, (Binary, Unary)):
        return _LEVEL[node.op]
    if isinstance(node, Const) and node.dtype is not DType.BOOL and _negative(node.value):
        return _NEG
    return _ATOM


def _negative(x) -> bool:
    return x < 0 or (isinstance(x, float) and x == 0 and math.copysign(1.0, x) < 0)


def _const(node: Const) -> str:
    if node.dtype is DType.BOOL:
        return "True" if node.value else "False"
    if node.dtype is DType.INT:
        return str(int(node.value))
    x = float(node.value)
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return repr(x)


def _wrap(child: Expr, parens: bool, names) -> str:
    text = to_source(child, names)
    return f"({text})" if parens else text


def to_source(node: Expr, names: dict | None = None) -> str:
    """Canonical text of an expression. ``names``: subexpressions to print as a name (to_program's bindings)."""
    if names and node in names:
        return names[node]

    def prec(n):
        return _ATOM if names and n in names else precedence(n)

    if isinstance(node, Const):
        return _const(node)
    if isinstance(node, Var):
        return node.name
    if isinstance(node, Index):
        return f"{node.tensor}[{', '.join(to_source(i, names) for i in node.indices)}]"
    if isinstance(node, Call):
        return f"{node.func}({', '.join(to_source(a, names) for a in node.args)})"
    level = _LEVEL[node.op]
    if isinstance(node, Unary):
        inner = prec(node.operand)
        spelling = _SPELLING[node.op]
        return f"{spelling}{_wrap(node.operand, inner < level, names)}"
    left, right = prec(node.left), prec(node.right)
    if node.op is Op.POW:
        lp, rp = left <= _POW, right < _NEG
    elif level == _CMP:
        lp, rp = left <= _CMP, right <= _CMP
    else:
        lp, rp = left < level, right <= level
    return f"{_wrap(node.left, lp, names)} {_SPELLING.get(node.op, node.op.value)} {_wrap(node.right, rp, names)}"


def to_program(node: Expr, avoid=(), min_size: int = 4) -> str:
    """Canonical text with bindings: every subexpression of at least ``min_size`` nodes that occurs more than once
    is bound once (``t1 = ...; t2 = ...; result``) and a binding used only once is inlined, so an expression
    expanded from bindings and reductions prints readably. ``avoid``: names the bindings must not take (params).
    Checking the text gives back ``node``."""
    sizes: dict = {}
    counts: dict = {}
    stack = [(node, False)]
    while stack:  # post-order; sizes per distinct subtree, counts per occurrence
        n, ready = stack.pop()
        kids = children(n)
        if ready or not kids:
            counts[n] = counts.get(n, 0) + 1
            if n not in sizes:
                sizes[n] = 1 + sum(sizes[k] for k in kids)
        else:
            stack.append((n, True))
            stack.extend((k, False) for k in reversed(kids))
    chosen = {n for n, c in counts.items() if c > 1 and sizes[n] >= min_size and not isinstance(n, (Const, Var))}
    while True:  # inline bindings used once (inside other bindings or the result)
        uses = dict.fromkeys(chosen, 0)
        for root in [node, *chosen]:
            todo = list(children(root)) if root in chosen else [root]
            while todo:
                n = todo.pop()
                if n in chosen:
                    uses[n] += 1
                else:
                    todo.extend(children(n))
        single = {n for n, u in uses.items() if u < 2}
        if not single:
            break
        chosen -= single
    if not chosen:
        return to_source(node)
    taken = names_used(node) | set(avoid)
    order = sorted(chosen, key=lambda n: (sizes[n], to_source(n)))  # inner bindings first
    names: dict = {}
    lines = []
    i = 0
    for n in order:
        i += 1
        while f"t{i}" in taken:
            i += 1
        text = to_source(n, names)  # inner bindings by name (bound before: they are smaller)
        names[n] = f"t{i}"
        lines.append(f"t{i} = {text}")
    return "; ".join(lines + [to_source(node, names)])
