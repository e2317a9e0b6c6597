"""Symbolic derivative of a score expression with respect to ``score``, over AST nodes.

Backends whose kernels take a hand-written backward of the score modification (FlashAttention-4's
``score_mod_bwd``) need d(score_expr)/d(score) as an expression of the same names (``score``, ``b``, ``h``,
``q_idx``, ``kv_idx``, tensors...). This module builds it from the typed AST alone: one rule per node kind, then a
small table of algebraic clean-ups so that e.g. ``score + bias[h]`` differentiates to the constant ``1.0``.

The derivative is that of PyTorch's autograd on the eager lowering (``attnlang.lower_torch``) almost everywhere:
floor/ceil/sign/int and comparisons are piecewise constant (derivative 0); ``abs`` uses sign(x); at the measure-zero
points where ``min``/``max``/``clamp`` operands tie, autograd splits the gradient while this routine picks one side.
Masks need no derivative: they only select which scores take part.
"""

from __future__ import annotations

import math

from .ast import Binary, Call, Const, DType, Expr, Index, Op, Unary, Var, children, walk

__all__ = ["derivative", "depends_on_score"]

_F = DType.FLOAT
_LN2 = math.log(2.0)


def _c(value: float) -> Const:
    return Const(float(value), _F)


def _is_const(e: Expr, value: float) -> bool:
    return isinstance(e, Const) and e.dtype is not DType.BOOL and float(e.value) == value


def depends_on_score(expr: Expr) -> bool:
    """True when ``score`` occurs anywhere in ``expr``."""
    return any(isinstance(n, Var) and n.name == "score" for n in walk(expr))


# ----- smart constructors: constant folding and identities as one table of (test, result) rows -----

def _fold(op: Op, a: Expr, b: Expr):
    if isinstance(a, Const) and isinstance(b, Const) and a.dtype is _F and b.dtype is _F:
        x, y = float(a.value), float(b.value)
        try:
            value = {Op.ADD: x + y, Op.SUB: x - y, Op.MUL: x * y,
                     Op.TRUEDIV: x / y if y != 0.0 else None}.get(op)
        except (OverflowError, ZeroDivisionError):
            return None
        if value is not None and math.isfinite(value):
            return _c(value)
    return None


_IDENTITIES = [
    (Op.ADD, lambda a, b: _is_const(a, 0.0), lambda a, b: b),            # 0 + x -> x
    (Op.ADD, lambda a, b: _is_const(b, 0.0), lambda a, b: a),            # x + 0 -> x
    (Op.SUB, lambda a, b: _is_const(b, 0.0), lambda a, b: a),            # x - 0 -> x
    (Op.SUB, lambda a, b: _is_const(a, 0.0), lambda a, b: _neg(b)),      # 0 - x -> -x
    (Op.MUL, lambda a, b: _is_const(a, 0.0) or _is_const(b, 0.0),
     lambda a, b: _c(0.0)),                                               # 0 * x -> 0 (x finite where used)
    (Op.MUL, lambda a, b: _is_const(a, 1.0), lambda a, b: _float(b)),    # 1 * x -> x
    (Op.MUL, lambda a, b: _is_const(b, 1.0), lambda a, b: _float(a)),    # x * 1 -> x
    (Op.MUL, lambda a, b: _fconst(a) and isinstance(b, Binary) and b.op is Op.MUL and _fconst(b.left),
     lambda a, b: _bin(Op.MUL, _c(float(a.value) * float(b.left.value)), b.right)),  # c1 * (c2 * x) -> (c1 c2) x
    (Op.MUL, lambda a, b: _fconst(b) and not _fconst(a), lambda a, b: _bin(Op.MUL, b, a)),  # x * c -> c * x
    (Op.TRUEDIV, lambda a, b: _is_const(a, 0.0), lambda a, b: _c(0.0)),  # 0 / x -> 0
    (Op.TRUEDIV, lambda a, b: _is_const(b, 1.0), lambda a, b: _float(a)),  # x / 1 -> x
]


def _fconst(e: Expr) -> bool:
    return isinstance(e, Const) and e.dtype is _F


def _float(e: Expr) -> Expr:
    if e.dtype is _F:
        return e
    if isinstance(e, Const):
        return _c(float(e.value))
    return Call("float", (e,), dtype=_F)


def _bin(op: Op, a: Expr, b: Expr) -> Expr:
    folded = _fold(op, a, b)
    if folded is not None:
        return folded
    for rule_op, test, result in _IDENTITIES:
        if rule_op is op and test(a, b):
            return result(a, b)
    return Binary(op, a, b, dtype=_F)


def _neg(a: Expr) -> Expr:
    if isinstance(a, Const) and a.dtype is _F:
        return _c(-float(a.value))
    if isinstance(a, Unary) and a.op is Op.NEG:
        return a.operand
    return Unary(Op.NEG, a, dtype=_F)


def _call(func: str, *args: Expr) -> Expr:
    return Call(func, tuple(args), dtype=_F)


# ----- the derivative rules: one function per function name, one branch per node kind -----

def _d_pow(node: Binary, da: Expr, db: Expr) -> Expr:
    a, b = node.left, node.right
    out = _c(0.0)
    if not _is_const(da, 0.0):
        if isinstance(b, Const):  # d(a^n) = n a^(n-1) da
            n = float(b.value)
            power = _c(1.0) if n == 1.0 else (a if n == 2.0 else _bin(Op.POW, _float(a), _c(n - 1.0)))
            out = _bin(Op.MUL, _bin(Op.MUL, _c(n), _float(power)), da)
        else:  # d(a^b) = b a^(b-1) da
            out = _bin(Op.MUL, _bin(Op.MUL, _float(b), _bin(Op.POW, _float(a), _bin(Op.SUB, _float(b), _c(1.0)))),
                       da)
    if not _is_const(db, 0.0):  # d(a^b) = a^b log(a) db
        out = _bin(Op.ADD, out, _bin(Op.MUL, _bin(Op.MUL, _float(node), _call("log", _float(a))), db))
    return out


def _d_binary(node: Binary, da: Expr, db: Expr) -> Expr:
    a, b, op = node.left, node.right, node.op
    if op is Op.ADD:
        return _bin(Op.ADD, da, db)
    if op is Op.SUB:
        return _bin(Op.SUB, da, db)
    if op is Op.MUL:  # product rule
        return _bin(Op.ADD, _bin(Op.MUL, da, _float(b)), _bin(Op.MUL, _float(a), db))
    if op is Op.TRUEDIV:  # quotient rule: da / b - a db / b^2
        first = _bin(Op.TRUEDIV, da, _float(b))
        if _is_const(db, 0.0):
            return first
        return _bin(Op.SUB, first, _bin(Op.TRUEDIV, _bin(Op.MUL, _float(a), db), _bin(Op.MUL, _float(b), _float(b))))
    if op is Op.FLOORDIV:  # piecewise constant
        return _c(0.0)
    if op is Op.MOD:  # a % b = a - b * floor(a / b)
        if _is_const(db, 0.0):
            return da
        return _bin(Op.SUB, da, _bin(Op.MUL, db, _call("floor", _bin(Op.TRUEDIV, _float(a), _float(b)))))
    if op is Op.POW:
        return _d_pow(node, da, db)
    return _c(0.0)  # comparisons and logic: booleans carry no gradient


def _d_call(node: Call, ds: list) -> Expr:
    f, args = node.func, node.args
    x = _float(args[0]) if args else None
    dx = ds[0] if ds else None
    if f == "where":
        if _is_const(ds[1], 0.0) and _is_const(ds[2], 0.0):
            return _c(0.0)
        return Call("where", (args[0], ds[1], ds[2]), dtype=_F)
    if f in ("floor", "ceil", "sign", "int"):
        return _c(0.0)
    if f == "float":
        return dx if args[0].dtype is _F else _c(0.0)
    if _is_const(dx, 0.0) and f not in ("min", "max", "clamp"):
        return _c(0.0)
    if f == "abs":
        return _bin(Op.MUL, _call("sign", x), dx)
    if f == "exp":
        return _bin(Op.MUL, _float(node), dx)
    if f == "exp2":
        return _bin(Op.MUL, _bin(Op.MUL, _float(node), _c(_LN2)), dx)
    if f == "log":
        return _bin(Op.TRUEDIV, dx, x)
    if f == "log2":
        return _bin(Op.TRUEDIV, dx, _bin(Op.MUL, x, _c(_LN2)))
    if f == "sqrt":
        return _bin(Op.TRUEDIV, dx, _bin(Op.MUL, _c(2.0), _float(node)))
    if f == "tanh":  # 1 - tanh^2
        t = _float(node)
        return _bin(Op.MUL, _bin(Op.SUB, _c(1.0), _bin(Op.MUL, t, t)), dx)
    if f == "erf":  # 2 / sqrt(pi) exp(-x^2)
        return _bin(Op.MUL, _bin(Op.MUL, _c(2.0 / math.sqrt(math.pi)), _call("exp", _neg(_bin(Op.MUL, x, x)))), dx)
    if f == "cos":
        return _bin(Op.MUL, _neg(_call("sin", x)), dx)
    if f == "sin":
        return _bin(Op.MUL, _call("cos", x), dx)
    if f == "sigmoid":  # s (1 - s)
        s = _float(node)
        return _bin(Op.MUL, _bin(Op.MUL, s, _bin(Op.SUB, _c(1.0), s)), dx)
    if f in ("min", "max"):
        if _is_const(ds[0], 0.0) and _is_const(ds[1], 0.0):
            return _c(0.0)
        pick_first = Binary(Op.LE if f == "min" else Op.GE, _float(args[0]), _float(args[1]), dtype=DType.BOOL)
        return Call("where", (pick_first, ds[0], ds[1]), dtype=_F)
    if f == "clamp":  # min(max(x, lo), hi)
        lo, hi = _float(args[1]), _float(args[2])
        if all(_is_const(d, 0.0) for d in ds):
            return _c(0.0)
        inner = Call("where", (Binary(Op.GE, x, lo, dtype=DType.BOOL), ds[0], ds[1]), dtype=_F)
        mx = Call("max", (x, lo), dtype=_F)
        return Call("where", (Binary(Op.LE, mx, hi, dtype=DType.BOOL), inner, ds[2]), dtype=_F)
    raise AssertionError(f"no derivative rule for function {f!r}")


def derivative(expr: Expr, wrt: str = "score") -> Expr:
    """d(expr)/d(wrt) as a typed AST (every node FLOAT or its operands' own types).

    Args:
        expr: a bound, fully typed float expression (``CallPlan.score``).
        wrt: the built-in name to differentiate by (``score``).
    Returns:
        an expression over the same names; ``Const(1.0)`` for ``score + anything-without-score``.
    """
    memo: dict = {}
    # post-order without recursion: expressions can be deep
    stack = [(expr, False)]
    while stack:
        node, done = stack.pop()
        key = (node, node.dtype)
        if key in memo:
            continue
        if done:
            memo[key] = _d_node(node, [memo[(c, c.dtype)] for c in children(node)], wrt)
            continue
        stack.append((node, True))
        stack.extend((c, False) for c in children(node) if (c, c.dtype) not in memo)
    return memo[(expr, expr.dtype)]


def _d_node(node: Expr, ds: list, wrt: str) -> Expr:
    if isinstance(node, Var):
        return _c(1.0) if node.name == wrt else _c(0.0)
    if isinstance(node, (Const, Index)):
        return _c(0.0)  # tensor values and their (integer) indices do not depend on score
    if node.dtype is not _F:
        return _c(0.0)  # int and bool subexpressions are piecewise constant in score
    if isinstance(node, Unary):
        return _neg(ds[0]) if node.op is Op.NEG else _c(0.0)
    if isinstance(node, Binary):
        return _d_binary(node, ds[0], ds[1])
    return _d_call(node, ds)
