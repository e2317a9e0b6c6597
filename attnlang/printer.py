"""The canonical printer: AST -> text with the fewest parentheses, so that ``parse(to_source(e)) == e``.

The canonical text is what a Variant hashes and compares, and what ``explain()`` shows.
"""

from __future__ import annotations

import math

from .ast import Binary, Call, Const, DType, Expr, Index, Op, Unary, Var

__all__ = ["to_source", "precedence"]

# Loosest first, as in LANGUAGE.md.
_OR, _AND, _NOT, _CMP, _SUM, _PRODUCT, _NEG, _POW, _ATOM = range(1, 10)

_LEVEL = {
    Op.OR: _OR, Op.AND: _AND, Op.NOT: _NOT,
    Op.LT: _CMP, Op.LE: _CMP, Op.GT: _CMP, Op.GE: _CMP, Op.EQ: _CMP, Op.NE: _CMP,
    Op.ADD: _SUM, Op.SUB: _SUM,
    Op.MUL: _PRODUCT, Op.TRUEDIV: _PRODUCT, Op.FLOORDIV: _PRODUCT, Op.MOD: _PRODUCT,
    Op.NEG: _NEG, Op.POW: _POW,
}

_SPELLING = {Op.AND: "&", Op.OR: "|", Op.NOT: "~", Op.NEG: "-"}


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


def _wrap(child: Expr, parens: bool) -> str:
    text = to_source(child)
    return f"({text})" if parens else text


def to_source(node: Expr) -> str:
    """Canonical text of an expression."""
    if isinstance(node, Const):
        return _const(node)
    if isinstance(node, Var):
        return node.name
    if isinstance(node, Index):
        return f"{node.tensor}[{', '.join(to_source(i) for i in node.indices)}]"
    if isinstance(node, Call):
        return f"{node.func}({', '.join(to_source(a) for a in node.args)})"
    level = _LEVEL[node.op]
    if isinstance(node, Unary):
        inner = precedence(node.operand)
        spelling = _SPELLING[node.op]
        return f"{spelling}{_wrap(node.operand, inner < level)}"
    left, right = precedence(node.left), precedence(node.right)
    if node.op is Op.POW:
        lp, rp = left <= _POW, right < _NEG
    elif level == _CMP:
        lp, rp = left <= _CMP, right <= _CMP
    else:
        lp, rp = left < level, right <= level
    return f"{_wrap(node.left, lp)} {_SPELLING.get(node.op, node.op.value)} {_wrap(node.right, rp)}"
