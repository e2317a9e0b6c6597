"""The simplifier: rewrite rules as data, applied bottom-up to a fixed point.

Rules are rows ``(pattern, fn)``: the pattern matches a node and captures parts of it by name; ``fn`` takes the
captures and returns the replacement, or None to decline. Rows are grouped in phases (plain lists, joined with
``+``): constant folding, algebraic identities, comparison normal forms. Two whole-expression steps follow: lifting
``where(c, s, -inf)`` from the score into the mask, and softmax shift invariance (additive score terms that depend
on neither ``kv_idx`` nor ``score`` drop out; they come back in ``lse_shift``).

Every rule keeps the variant's output exactly (the shift rule up to floating-point rounding of the regrouped sum)
and keeps each node's type; rules whose validity would depend on the element type of a tensor read not yet known
(``DType.UNKNOWN``) decline. Rewritten nodes keep the span of the node they replace.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace

from .ast import (
    MIRRORED,
    NEGATED,
    Binary,
    Call,
    Const,
    DType,
    Expr,
    Op,
    Span,
    Unary,
    Var,
    children,
    names_used,
    with_children,
)

__all__ = ["Simplified", "simplify_variant", "simplify", "rewrite", "affine_form", "affine_difference", "Pat", "RULES",
           "PHASES", "MAX_PASSES"]

MAX_PASSES = 64          # loop guard of the fixed point
_INT64 = (-(1 << 63), (1 << 63) - 1)


@dataclass(frozen=True)
class Simplified:
    """score, mask: the rewritten expressions.
    lse_shift: a per-row term dropped from the score by softmax shift invariance (None if none), which backends add
        back to lse.
    score_unshifted: the score before the shift rule (None when no shift was applied); use it (and no lse_shift)
        when lse_shift is not finite everywhere, since dropping a -inf / +inf / NaN row term changes the result.
    trace: one line per rule that fired, in order.
    sink: the simplified sink (None if none, or if it is -inf, which is the same as none); when the shift rule
        dropped a row term c from the score, the sink is ``sink - c``: with lse' = log(exp(sink - c) + sum
        exp(s - c)) = lse - c, the output is unchanged and lse' + c (the lse shift) is the original lse.
    sink_unshifted: the sink before the shift rule (None when no shift was applied or there is no sink); used with
        score_unshifted."""

    score: Expr
    mask: Expr
    lse_shift: Expr | None = None
    trace: tuple[str, ...] = ()
    score_unshifted: Expr | None = None
    sink: Expr | None = None
    sink_unshifted: Expr | None = None


# ---------------------------------------------------------------------------------------------------------------
# patterns

_ANY = object()
_COMMUTATIVE = frozenset({Op.ADD, Op.MUL, Op.AND, Op.OR, Op.EQ, Op.NE})


@dataclass(frozen=True)
class Pat:
    """A node pattern. cls: node class; op / func: operator or function name (a tuple allows several);
    src: child patterns; value: a Const's value; dtype: the node's dtype (a tuple allows several); name: capture.
    Binary patterns on commutative operators also match with the operands swapped."""

    cls: type | None = None
    op: object = None
    func: object = None
    src: tuple | None = None
    value: object = _ANY
    dtype: object = None
    name: str | None = None

    def match(self, node: Expr, caps: dict) -> bool:
        if self.cls is not None and not isinstance(node, self.cls):
            return False
        if self.op is not None:
            op = getattr(node, "op", None)
            if op is not self.op and not (isinstance(self.op, tuple) and op in self.op):
                return False
        if self.func is not None:
            f = getattr(node, "func", None)
            if f != self.func and not (isinstance(self.func, tuple) and f in self.func):
                return False
        if self.value is not _ANY:
            if not isinstance(node, Const):
                return False
            if type(node.value) is bool or type(self.value) is bool:
                if node.value is not self.value:
                    return False
            elif node.value != self.value:
                return False
        if self.dtype is not None:
            if node.dtype is not self.dtype and not (isinstance(self.dtype, tuple) and node.dtype in self.dtype):
                return False
        if self.name is not None:
            if self.name in caps:
                if caps[self.name] != node:
                    return False
            else:
                caps[self.name] = node
        if self.src is None:
            return True
        kids = children(node)
        if len(kids) != len(self.src):
            return False
        snapshot = dict(caps)
        if all(p.match(k, caps) for p, k in zip(self.src, kids)):
            return True
        if isinstance(node, Binary) and node.op in _COMMUTATIVE:
            caps.clear()
            caps.update(snapshot)
            if self.src[0].match(kids[1], caps) and self.src[1].match(kids[0], caps):
                return True
        caps.clear()
        caps.update(snapshot)
        return False


def X(name: str, dtype=None) -> Pat:
    """Any node, captured."""
    return Pat(name=name, dtype=dtype)


def C(name: str | None = None, value=_ANY, dtype=None) -> Pat:
    """A constant."""
    return Pat(cls=Const, name=name, value=value, dtype=dtype)


def B(op, left: Pat, right: Pat, name: str | None = "n", dtype=None) -> Pat:
    return Pat(cls=Binary, op=op, src=(left, right), name=name, dtype=dtype)


def U(op, x: Pat, name: str | None = "n", dtype=None) -> Pat:
    return Pat(cls=Unary, op=op, src=(x,), name=name, dtype=dtype)


def F(func, *args: Pat, name: str | None = "n", dtype=None) -> Pat:
    return Pat(cls=Call, func=func, src=tuple(args), name=name, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# node builders: dtypes by the checker's rules, so a rewritten tree is typed like a checked one

def _join(a: DType, b: DType) -> DType:
    if DType.UNKNOWN in (a, b):
        return DType.UNKNOWN
    return DType.FLOAT if DType.FLOAT in (a, b) else DType.INT


def mk_binary(op: Op, left: Expr, right: Expr, span: Span | None = None) -> Binary:
    if op in (Op.AND, Op.OR) or op in _CMP:
        dt = DType.BOOL
    elif op in (Op.BITAND, Op.BITOR, Op.XOR, Op.LSHIFT, Op.RSHIFT):
        dt = DType.INT
    elif op is Op.TRUEDIV:
        dt = DType.FLOAT
    else:
        dt = _join(left.dtype, right.dtype)
    return Binary(op, left, right, span, dt)


def mk_neg(x: Expr, span: Span | None = None) -> Expr:
    return Unary(Op.NEG, x, span, x.dtype)


def mk_not(x: Expr, span: Span | None = None) -> Expr:
    return Unary(Op.NOT, x, span, DType.BOOL)


def _int(v: int, span=None) -> Const:
    return Const(int(v), DType.INT, span)


_CMP = frozenset({Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE})
_TRUE, _FALSE = Const(True, DType.BOOL), Const(False, DType.BOOL)


def _known(*nodes) -> bool:
    return all(n.dtype in (DType.INT, DType.FLOAT, DType.BOOL) for n in nodes)


def _span(node: Expr, new: Expr) -> Expr:
    """``new`` with the span of the node it replaces (when it has none of its own)."""
    if getattr(new, "span", None) is None and node.span is not None:
        return replace(new, span=node.span)
    return new


# ---------------------------------------------------------------------------------------------------------------
# phase 1: constant folding, with LANGUAGE.md's exact semantics; never folds to NaN, inf from finite inputs
# overflow, or a division by zero (those stay for the checker and the run time to report)

def _floordiv(a, b):
    return a // b  # Python's floor division: the language's


_PY_BINARY = {
    Op.ADD: operator.add, Op.SUB: operator.sub, Op.MUL: operator.mul, Op.TRUEDIV: operator.truediv,
    Op.FLOORDIV: _floordiv, Op.MOD: operator.mod, Op.POW: operator.pow,
    Op.LT: operator.lt, Op.LE: operator.le, Op.GT: operator.gt, Op.GE: operator.ge, Op.EQ: operator.eq,
    Op.NE: operator.ne, Op.AND: operator.and_, Op.OR: operator.or_,
    Op.BITAND: operator.and_, Op.BITOR: operator.or_, Op.XOR: operator.xor, Op.LSHIFT: operator.lshift,
    Op.RSHIFT: operator.rshift,
}


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))


_PY_FUNC = {
    "exp": math.exp, "exp2": lambda v: 2.0 ** v, "log": math.log, "log2": math.log2, "sqrt": math.sqrt,
    "tanh": math.tanh, "sigmoid": _sigmoid, "erf": math.erf, "cos": math.cos, "sin": math.sin,
}


def _const_of(value, dtype: DType, span) -> Const | None:
    if dtype is DType.BOOL:
        return Const(bool(value), DType.BOOL, span)
    if dtype is DType.INT:
        v = int(value)
        return Const(v, DType.INT, span) if _INT64[0] <= v <= _INT64[1] else None
    v = float(value)
    return None if math.isnan(v) else Const(v, DType.FLOAT, span)


def _num(c: Const, dtype: DType):
    """The constant's value converted to the operation's type, as the run time does."""
    if dtype is DType.FLOAT:
        return float(c.value)
    if dtype is DType.INT:
        return int(c.value)
    return c.value


def fold_binary(n: Binary, a: Const, b: Const) -> Const | None:
    if not _known(n, a, b):
        return None
    op = n.op
    if op in (Op.AND, Op.OR):
        return _const_of(_PY_BINARY[op](bool(a.value), bool(b.value)), DType.BOOL, n.span)
    if op in _CMP:
        common = DType.BOOL if a.dtype is DType.BOOL and b.dtype is DType.BOOL else _join(a.dtype, b.dtype)
        return _const_of(_PY_BINARY[op](_num(a, common), _num(b, common)), DType.BOOL, n.span)
    x, y = _num(a, n.dtype), _num(b, n.dtype)
    if op in (Op.TRUEDIV, Op.FLOORDIV, Op.MOD) and y == 0:
        return None  # a division by zero is the run time's to report (or inf / NaN in floats)
    if op in (Op.LSHIFT, Op.RSHIFT) and not 0 <= y <= 63:
        return None  # a shift out of [0, 63] is the checker's to report
    if op is Op.POW and n.dtype is DType.INT and (y < 0 or abs(x) > 1 and y > 64):
        return None  # a negative exponent is an error; past 64 the power leaves int64 (and could take long to compute)
    if op in (Op.FLOORDIV, Op.MOD) and n.dtype is DType.FLOAT and (math.isinf(x) or math.isinf(y)):
        return None  # torch and Python disagree on inf // y and x % inf
    try:
        r = _PY_BINARY[op](x, y)
    except (OverflowError, ZeroDivisionError, ValueError):
        return None
    if isinstance(r, complex):
        return None
    if n.dtype is DType.FLOAT and math.isinf(r) and math.isfinite(x) and math.isfinite(y):
        return None  # overflow: leave it to the run time
    return _const_of(r, n.dtype, n.span)


def fold_unary(n: Unary, a: Const) -> Const | None:
    if not _known(n, a):
        return None
    if n.op is Op.NOT:
        return _const_of(not a.value, DType.BOOL, n.span)
    return _const_of(-_num(a, n.dtype), n.dtype, n.span)


def fold_call(n: Call) -> Const | None:
    if not all(isinstance(x, Const) for x in n.args) or not _known(n, *n.args):
        return None
    f, args, dt = n.func, n.args, n.dtype
    try:
        if f == "where":
            pick = args[1] if args[0].value else args[2]
            return _const_of(_num(pick, dt), dt, n.span)
        if f == "float":
            return _const_of(float(args[0].value), DType.FLOAT, n.span)
        if f == "int":
            v = args[0].value
            if isinstance(v, float) and not math.isfinite(v):
                return None
            return _const_of(math.trunc(v), DType.INT, n.span)
        xs = [_num(x, dt) for x in args]
        if f in _PY_FUNC:
            if f in ("log", "log2") and xs[0] == 0:
                return _const_of(-math.inf, DType.FLOAT, n.span)
            r = _PY_FUNC[f](xs[0])
        elif f == "abs":
            r = abs(xs[0])
        elif f == "sign":
            r = (xs[0] > 0) - (xs[0] < 0)
        elif f in ("floor", "ceil"):
            if dt is DType.INT or not math.isfinite(xs[0]):
                r = xs[0]
            else:
                r = float(math.floor(xs[0]) if f == "floor" else math.ceil(xs[0]))
        elif f == "min":
            r = min(xs)
        elif f == "max":
            r = max(xs)
        elif f == "clamp":
            r = min(max(xs[0], xs[1]), xs[2])
        else:
            return None
    except (OverflowError, ValueError, ZeroDivisionError):
        return None
    if isinstance(r, float) and math.isinf(r) and all(math.isfinite(float(x)) for x in xs):
        return None
    return _const_of(r, dt, n.span)


FOLD = [
    (B(None, C("a"), C("b")), fold_binary),                       # const op const -> const
    (U(None, C("a")), fold_unary),                                # -c, ~c -> const
    (Pat(cls=Call, name="n"), fold_call),                         # f(const, ...) -> const
]


# ---------------------------------------------------------------------------------------------------------------
# phase 2: algebraic identities

def _is_zero(c: Const) -> bool:
    return c.dtype in (DType.INT, DType.FLOAT) and c.value == 0


def add_zero(n, x, z):
    # ints only: in floats -0.0 + 0.0 is +0.0, so x + 0.0 is not x when x is -0.0
    if _is_zero(z) and n.dtype is DType.INT and x.dtype is DType.INT:
        return x
    return None


def sub_zero(n, x, z):
    # x - 0 is x for ints, and for floats too (x - (+0.0) keeps -0.0), when the type does not widen; not x - (-0.0),
    # which is x + 0.0: +0.0 where x is -0.0 (1.0 / (score * 0.0 - -0.0) is +inf for a negative score, not -inf)
    if _is_zero(z) and (x.dtype is DType.INT and z.dtype is DType.INT
                        or x.dtype is DType.FLOAT and math.copysign(1.0, z.value) > 0):
        return x
    return None


def zero_sub(n, z, x):
    if _is_zero(z) and n.dtype is DType.INT and x.dtype is DType.INT:
        return mk_neg(x, n.span)
    return None


def mul_one(n, x, one):
    # x * 1 has x's type unless 1.0 turns an int into a float
    if one.dtype in (DType.INT, DType.FLOAT) and one.value == 1 and (one.dtype is DType.INT and x.dtype in (
            DType.INT, DType.FLOAT, DType.UNKNOWN) or x.dtype is DType.FLOAT):
        return x
    return None


def div_one(n, x, one):
    # x / 1 is x only for floats (/ of ints gives a float)
    if one.dtype in (DType.INT, DType.FLOAT) and one.value == 1 and x.dtype is DType.FLOAT:
        return x
    return None


def floordiv_one(n, x, one):
    if one.dtype is DType.INT and one.value == 1 and x.dtype is DType.INT:
        return x
    return None


def mul_zero(n, x, z):
    # ints only: in floats inf * 0 and NaN * 0 are NaN
    if _is_zero(z) and z.dtype is DType.INT and x.dtype is DType.INT:
        return _int(0, n.span)
    return None


def mod_one(n, x, one):
    if one.dtype is DType.INT and one.value == 1 and x.dtype is DType.INT:
        return _int(0, n.span)
    return None


def shift_zero(n, x, z):
    return x if _is_zero(z) and z.dtype is DType.INT and x.dtype is DType.INT else None


def sub_self(n, x):
    if n.dtype is DType.INT and x.dtype is DType.INT:
        return _int(0, n.span)
    return None


def neg_neg(n, x):
    return x if x.dtype is not DType.BOOL else None


def not_not(n, x):
    return x


def and_true(n, x, t):
    return x if t.value is True and x.dtype is DType.BOOL else None


def and_false(n, x, f):
    return Const(False, DType.BOOL, n.span) if f.value is False else None


def or_true(n, x, t):
    return Const(True, DType.BOOL, n.span) if t.value is True else None


def or_false(n, x, f):
    return x if f.value is False and x.dtype is DType.BOOL else None


def idempotent(n, x):
    return x if x.dtype is DType.BOOL else None


def where_const(n, c, a, b):
    # the branch taken must already have the where's type (an int branch of a float where would change type)
    pick = a if c.value else b
    return pick if pick.dtype is n.dtype and n.dtype is not DType.UNKNOWN else None


def where_same(n, c, a):
    return a if a.dtype is n.dtype and n.dtype is not DType.UNKNOWN else None


def where_not(n, c, a, b):
    return Call("where", (c, b, a), n.span, n.dtype)


def float_of_float(n, x):
    return x if x.dtype is DType.FLOAT else None


def int_of_int(n, x):
    return x if x.dtype is DType.INT else None


def minmax_self(n, x):
    return x if x.dtype is n.dtype and n.dtype is not DType.UNKNOWN else None


def not_compare(n, a, b, c):
    """~(a == b) -> a != b and ~(a != b) -> a == b always (NaN compares unequal either way); the order
    comparisons only for ints, since ~(NaN < x) is True but NaN >= x is False."""
    op = c.op
    if op in (Op.EQ, Op.NE):
        return mk_binary(Op.NE if op is Op.EQ else Op.EQ, a, b, n.span)
    if a.dtype is DType.INT and b.dtype is DType.INT:
        return mk_binary(NEGATED[op], a, b, n.span)
    return None


_EXACT = 1 << 53  # ints up to here are exact float64 values, so the literal's value does not change


def _as_float(x: Expr) -> Expr:
    if isinstance(x, Const) and x.dtype is DType.INT and abs(x.value) <= _EXACT:
        return Const(float(x.value), DType.FLOAT, x.span)
    return x


def float_literal_operand(n):
    """An int literal that meets a float in arithmetic or a comparison is converted there (LANGUAGE.md: int op float
    is float): written as the float literal, so ``score + 1`` and ``score + 1.0`` have one canonical form. A
    power's exponent keeps its spelling (an int exponent is a repeated product)."""
    if n.op in _CMP:
        if DType.FLOAT not in (n.left.dtype, n.right.dtype) or DType.UNKNOWN in (n.left.dtype, n.right.dtype):
            return None
    elif n.dtype is not DType.FLOAT or n.op not in _FLOAT_ARITH:
        return None
    left = _as_float(n.left)
    right = n.right if n.op is Op.POW else _as_float(n.right)
    if left is n.left and right is n.right:
        return None
    return Binary(n.op, left, right, n.span, n.dtype)


def float_literal_arg(n):
    """The same for the number arguments of a float min / max / clamp / where (``max(score, 0)`` is
    ``max(score, 0.0)``)."""
    if n.dtype is not DType.FLOAT:
        return None
    first = 1 if n.func == "where" else 0  # where's condition is bool
    args = n.args[:first] + tuple(_as_float(a) for a in n.args[first:])
    return None if all(a is b for a, b in zip(args, n.args)) else Call(n.func, args, n.span, n.dtype)


_FLOAT_ARITH = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.TRUEDIV, Op.FLOORDIV, Op.MOD, Op.POW})


def sub_neg(n, x, y):
    # x - (-y) -> x + y: exact in ints and floats alike
    return mk_binary(Op.ADD, x, y, n.span) if _join(x.dtype, y.dtype) is n.dtype else None


def add_neg(n, x, y):
    # x + (-y) -> x - y: exact in ints and floats alike
    return mk_binary(Op.SUB, x, y, n.span) if _join(x.dtype, y.dtype) is n.dtype else None


IDENTITIES = [
    (B(Op.ADD, X("x"), C("z")), add_zero),                                  # x + 0 -> x (ints)
    (B(Op.SUB, X("x"), C("z")), sub_zero),                                  # x - 0 -> x
    (B(Op.SUB, C("z"), X("x")), zero_sub),                                  # 0 - x -> -x (ints)
    (B(Op.MUL, X("x"), C("one")), mul_one),                                 # x * 1 -> x
    (B(Op.TRUEDIV, X("x"), C("one")), div_one),                             # x / 1.0 -> x (floats)
    (B(Op.FLOORDIV, X("x"), C("one")), floordiv_one),                       # x // 1 -> x (ints)
    (B(Op.MUL, X("x"), C("z")), mul_zero),                                  # x * 0 -> 0 (ints only)
    (B(Op.MOD, X("x"), C("one")), mod_one),                                 # x % 1 -> 0 (ints)
    (B(Op.SUB, X("x"), X("x")), sub_self),                                  # x - x -> 0 (ints)
    (B((Op.LSHIFT, Op.RSHIFT), X("x"), C("z")), shift_zero),                # x << 0 -> x, x >> 0 -> x
    (B(Op.SUB, X("x"), U(Op.NEG, X("y"), name=None)), sub_neg),             # x - -y -> x + y
    (B(Op.ADD, X("x"), U(Op.NEG, X("y"), name=None)), add_neg),             # x + -y -> x - y
    (U(Op.NEG, U(Op.NEG, X("x"), name=None)), neg_neg),                     # --x -> x
    (U(Op.NOT, U(Op.NOT, X("x"), name=None)), not_not),                     # ~~x -> x
    (U(Op.NOT, Pat(cls=Binary, op=tuple(_CMP), src=(X("a"), X("b")), name="c")), not_compare),  # ~(a<b) -> a>=b
    (B(Op.AND, X("x"), C("t", True)), and_true),                            # x & True -> x
    (B(Op.AND, X("x"), C("f", False)), and_false),                          # x & False -> False
    (B(Op.OR, X("x"), C("t", True)), or_true),                              # x | True -> True
    (B(Op.OR, X("x"), C("f", False)), or_false),                            # x | False -> x
    (B((Op.AND, Op.OR), X("x"), X("x")), idempotent),                       # x & x -> x, x | x -> x
    (F("where", C("c", dtype=DType.BOOL), X("a"), X("b")), where_const),    # where(True, a, b) -> a
    (F("where", X("c"), X("a"), X("a")), where_same),                       # where(c, a, a) -> a
    (F("where", U(Op.NOT, X("c"), name=None), X("a"), X("b")), where_not),  # where(~c, a, b) -> where(c, b, a)
    (F("float", X("x")), float_of_float),                                   # float(x) -> x for a float x
    (F("int", X("x")), int_of_int),                                         # int(x) -> x for an int x
    (F(("min", "max"), X("x"), X("x")), minmax_self),                       # min(x, x) -> x
    (Pat(cls=Binary, name="n"), float_literal_operand),                    # score + 1 -> score + 1.0
    (Pat(cls=Call, func=("min", "max", "clamp", "where"), name="n"), float_literal_arg),  # max(s, 0) -> max(s, 0.0)
]


# ---------------------------------------------------------------------------------------------------------------
# phase 3: comparison normal forms, so that equivalent spellings print (and compare) the same

_POSITION_ORDER = ("q_idx", "kv_idx", "b", "h", "q_len", "kv_len")


def affine_form(node: Expr):
    """``(coefficients, constant)`` when ``node`` is an integer affine form of the built-in integer names
    (``{name: int}``, int), else None. Iterative, so long sums do not recurse."""
    if node.dtype is not DType.INT:
        return None
    coef: dict[str, int] = {}
    const = 0
    stack = [(node, 1)]
    while stack:
        n, k = stack.pop()
        if n.dtype is not DType.INT:
            return None
        if isinstance(n, Const):
            const += k * int(n.value)
        elif isinstance(n, Var) and n.name in _POSITION_ORDER:
            coef[n.name] = coef.get(n.name, 0) + k
        elif isinstance(n, Unary) and n.op is Op.NEG:
            stack.append((n.operand, -k))
        elif isinstance(n, Binary) and n.op in (Op.ADD, Op.SUB):
            stack.append((n.left, k))
            stack.append((n.right, k if n.op is Op.ADD else -k))
        elif isinstance(n, Binary) and n.op is Op.MUL and isinstance(n.right, Const):
            stack.append((n.left, k * int(n.right.value)))
        elif isinstance(n, Binary) and n.op is Op.MUL and isinstance(n.left, Const):
            stack.append((n.right, k * int(n.left.value)))
        else:
            return None
    return {v: c for v, c in coef.items() if c}, const


def affine_difference(left: Expr, right: Expr):
    """``left - right`` as ``(coefficients without zeros, constant)`` when both are integer affine forms, else
    None: the shape every analysis of an integer comparison starts from (simplifier, patterns, sparsity)."""
    if left.dtype is not DType.INT or right.dtype is not DType.INT:
        return None
    fa, fb = affine_form(left), affine_form(right)
    if fa is None or fb is None:
        return None
    return subtract_affine(fa, fb)


def subtract_affine(fa, fb):
    """The affine form ``fa - fb`` (both from ``affine_form``), zero coefficients dropped."""
    coef = dict(fa[0])
    for k, v in fb[0].items():
        coef[k] = coef.get(k, 0) - v
    return {k: v for k, v in coef.items() if v}, fa[1] - fb[1]


def _linear(terms, span) -> Expr:
    """sum of coef * name, names in canonical order, as a tree of + and - (empty: 0)."""
    out = None
    for name, k in terms:
        v = Var(name, None, DType.INT)
        mag = abs(k)
        term = v if mag == 1 else mk_binary(Op.MUL, _int(mag), v)
        if out is None:
            out = term if k > 0 else mk_neg(term)
        else:
            out = mk_binary(Op.ADD if k > 0 else Op.SUB, out, term)
    return out


def _with_const(expr: Expr | None, c: int) -> Expr:
    if expr is None:
        return _int(c)
    if c == 0:
        return expr
    return mk_binary(Op.ADD if c > 0 else Op.SUB, expr, _int(abs(c)))


def affine_compare(n, a, b):
    """An integer comparison of two affine forms -> ``P OP N + k``: the terms with positive coefficients on the
    left, the others on the right with the constant, the first name (q_idx, kv_idx, b, h, q_len, kv_len order)
    on the left; strict orders become non-strict (``x < y`` -> ``x <= y - 1``, ints only)."""
    diff = affine_difference(a, b)
    if diff is None:
        return None
    coef, c = diff  # a OP b  <=>  sum(coef * name) + c OP 0
    if not coef:
        return None  # constant comparisons are folded
    op = n.op
    order = sorted(coef, key=_POSITION_ORDER.index)
    if coef[order[0]] < 0:  # multiply by -1: flip the order
        coef = {k: -v for k, v in coef.items()}
        c = -c
        op = MIRRORED[op]
    t = -c  # sum(coef * name) OP t
    if max(abs(t) + 1, *(abs(v) for v in coef.values())) >= 1 << 62:
        return None  # near int64's range the run time wraps where Python's ints do not: leave it as written
    if op is Op.LT:
        op, t = Op.LE, t - 1
    elif op is Op.GT:
        op, t = Op.GE, t + 1
    left = _linear([(k, coef[k]) for k in order if coef[k] > 0], None)
    neg = [(k, -coef[k]) for k in order if coef[k] < 0]
    right = _with_const(_linear(neg, None), t)
    out = Binary(op, left, right, n.span, DType.BOOL)
    return None if out == n else out


def _sort_key(e: Expr):
    from .printer import to_source
    return (0 if "q_idx" in names_used(e) else 1, to_source(e))


def orient_compare(n, a, b):
    """A constant goes right (``0 < x`` -> ``x > 0``); otherwise the side mentioning q_idx (then the smaller text)
    goes left. Exact for every type: it only swaps the operands and mirrors the operator."""
    if a.dtype is DType.INT and b.dtype is DType.INT and affine_form(a) is not None \
            and affine_form(b) is not None:
        return None  # affine_compare owns these
    if isinstance(a, Const) and not isinstance(b, Const):
        swap = True
    elif isinstance(b, Const):
        swap = False
    else:
        swap = _sort_key(a) > _sort_key(b)
    if not swap:
        return None
    return Binary(MIRRORED[n.op], b, a, n.span, DType.BOOL)


_CHAIN = 32  # longer chains (from reductions) are rebuilt balanced, so every recursive stage stays shallow


def _chain(items: list, make):
    """``items`` joined left to right (a left-deep tree), or, past _CHAIN items, as two halves each built the same
    way: every subtree is then the tree of its own items, so sorting it again changes nothing (a fixed point)."""
    if len(items) <= _CHAIN:
        out = items[0]
        for x in items[1:]:
            out = make(out, x)
        return out
    half = len(items) // 2
    return make(_chain(items[:half], make), _chain(items[half:], make))


def sort_logic(n):
    """Flatten a chain of & (or |), drop repeats and order the operands canonically: & and | are commutative and
    associative on bools, and nothing is short-circuited."""
    op = n.op
    leaves, stack = [], [n]
    while stack:
        x = stack.pop()
        if isinstance(x, Binary) and x.op is op:
            stack.append(x.right)
            stack.append(x.left)
        else:
            leaves.append(x)
    if any(x.dtype not in (DType.BOOL, DType.UNKNOWN) for x in leaves):
        return None  # an unknown read under & must bind to bool (else binding fails either way)
    uniq = sorted({x: None for x in leaves}, key=_sort_key)
    out = _chain(uniq, lambda a, b: Binary(op, a, b, None, DType.BOOL))
    out = replace(out, span=n.span) if isinstance(out, Binary) else out
    return None if out == n else out


NORMAL_FORMS = [
    (Pat(cls=Binary, op=tuple(_CMP), src=(X("a"), X("b")), name="n"), affine_compare),  # affine: P OP N + k
    (Pat(cls=Binary, op=tuple(_CMP), src=(X("a"), X("b")), name="n"), orient_compare),  # const right, q_idx left
    (Pat(cls=Binary, op=(Op.AND, Op.OR), name="n"), sort_logic),                         # a & b & a -> sorted set
]

PHASES = {"fold": FOLD, "identities": IDENTITIES, "normal forms": NORMAL_FORMS}
RULES = FOLD + IDENTITIES + NORMAL_FORMS


# ---------------------------------------------------------------------------------------------------------------
# the driver

def _index_rules(rules):
    """Rows grouped by (node class, op or func) so each node tries only the rules that can match it."""
    table: dict = {}
    for pat, fn in rules:
        keys = []
        ops = pat.op if isinstance(pat.op, tuple) else (pat.op,)
        funcs = pat.func if isinstance(pat.func, tuple) else (pat.func,)
        for op in ops:
            for f in funcs:
                keys.append((pat.cls, op if pat.cls in (Binary, Unary) else None,
                             f if pat.cls is Call else None))
        for k in keys:
            table.setdefault(k, []).append((pat, fn))
    return table


_TABLE = _index_rules(RULES)


def _candidates(node: Expr, table) -> list:
    cls = type(node)
    key = (cls, getattr(node, "op", None) if cls in (Binary, Unary) else None, node.func if cls is Call else None)
    generic = (cls, None, None)
    return table.get(key, []) + table.get(generic, []) if key != generic else table.get(generic, [])


def _apply_rules(node: Expr, table, trace: list | None) -> Expr:
    """Rules at one node until none fires (children already simplified)."""
    for _ in range(MAX_PASSES):
        for pat, fn in _candidates(node, table):
            caps: dict = {}
            if not pat.match(node, caps):
                continue
            new = fn(**caps)
            if new is None or new == node and type(new) is type(node) and new.dtype is node.dtype:
                continue
            if trace is not None:
                trace.append(fn.__name__)
            node = _span(node, new)
            break
        else:
            return node
    return node


def rewrite(expr: Expr, rules=RULES, trace: list | None = None) -> Expr:
    """Apply ``rules`` bottom-up until nothing changes (at most MAX_PASSES passes). Iterative: deep expressions
    cannot overflow the stack. Appends the name of each rule that fired to ``trace``."""
    table = rules if isinstance(rules, dict) else _index_rules(rules)
    settled: dict[int, Expr] = {}  # subtrees no rule changes: later passes skip them
    for _ in range(MAX_PASSES):
        fired: list[str] = []
        expr = _one_pass(expr, table, fired, settled)
        if trace is not None:
            trace.extend(fired)
        if not fired:
            return expr
    return expr


def _one_pass(root: Expr, table, fired: list, settled: dict) -> Expr:
    done: dict[int, Expr] = {}
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if id(node) in done:
            continue
        if settled.get(id(node)) is node:
            done[id(node)] = node
            continue
        kids = children(node)
        if kids and not expanded:
            stack.append((node, True))
            stack.extend((k, False) for k in kids if id(k) not in done)
            continue
        new_kids = tuple(done[id(k)] for k in kids)
        rebuilt = node if all(a is b for a, b in zip(new_kids, kids)) else with_children(node, new_kids)
        before = len(fired)
        out = _apply_rules(rebuilt, table, fired)
        if len(fired) == before and all(settled.get(id(k)) is k for k in new_kids):
            settled[id(out)] = out  # its whole subtree is a fixed point
        done[id(node)] = out
    return done[id(root)]


def simplify(expr: Expr, trace: list | None = None) -> Expr:
    """One expression through fold, identities and normal forms to a fixed point."""
    return rewrite(expr, _TABLE, trace)


# ---------------------------------------------------------------------------------------------------------------
# whole-variant steps: mask lifting and shift invariance

def _is_neg_inf(x: Expr) -> bool:
    return isinstance(x, Const) and x.dtype is DType.FLOAT and x.value == -math.inf


def lift_mask(score: Expr, mask: Expr, trace: list) -> tuple[Expr, Expr]:
    """``where(c, s, -inf)`` at the top of the score -> score ``s``, mask ``mask & c`` (and ``where(c, -inf, s)``
    -> ``mask & ~c``): a -inf score is a masked pair. Only when ``s`` is a float, so the score keeps its type."""
    for _ in range(MAX_PASSES):
        if not (isinstance(score, Call) and score.func == "where"):
            break
        c, a, b = score.args
        if _is_neg_inf(b) and a.dtype is DType.FLOAT:
            cond, score = c, a
        elif _is_neg_inf(a) and b.dtype is DType.FLOAT:
            cond, score = mk_not(c, c.span), b
        else:
            break
        mask = cond if isinstance(mask, Const) and mask.value is True else mk_binary(Op.AND, mask, cond, mask.span)
        trace.append("lift_mask")
    return score, mask


def _row_only(e: Expr) -> bool:
    used = names_used(e)
    return "kv_idx" not in used and "score" not in used


def _terms(expr: Expr) -> list[tuple[int, Expr]] | None:
    """The additive terms of ``expr`` with signs, distributing a row-only factor over a sum that mixes row and
    column terms (``a * (kv - q)`` -> ``a * kv - a * q``). None if there is nothing to split."""
    out: list[tuple[int, Expr]] = []
    for s, n in _terms_flat(expr):
        if isinstance(n, Binary) and n.op is Op.MUL and (_row_only(n.left) or _row_only(n.right)):
            factor, other = (n.left, n.right) if _row_only(n.left) else (n.right, n.left)
            inner = _terms_flat(other)
            if _row_only(other) or len(inner) < 2 or not any(_row_only(t) for _, t in inner):
                out.append((s, n))
            else:
                for s2, t in inner:
                    prod = mk_binary(Op.MUL, factor, t, n.span) if factor is n.left else \
                        mk_binary(Op.MUL, t, factor, n.span)
                    out.append((s * s2, prod))
        else:
            out.append((s, n))
    return out


def _terms_flat(expr: Expr) -> list[tuple[int, Expr]]:
    out, stack = [], [(expr, 1)]
    while stack:
        n, s = stack.pop()
        if isinstance(n, Binary) and n.op in (Op.ADD, Op.SUB):
            stack.append((n.right, s if n.op is Op.ADD else -s))
            stack.append((n.left, s))
        elif isinstance(n, Unary) and n.op is Op.NEG:
            stack.append((n.operand, -s))
        else:
            out.append((s, n))
    return out


def _sum(terms: list[tuple[int, Expr]], span) -> Expr | None:
    if len(terms) > _CHAIN:  # a long sum (a reduction's) stays balanced
        return _chain([t if s > 0 else mk_neg(t, t.span) for s, t in terms], lambda a, b: mk_binary(Op.ADD, a, b, span))
    out = None
    for s, t in terms:
        if out is None:
            out = t if s > 0 else mk_neg(t, t.span)
        else:
            out = mk_binary(Op.ADD if s > 0 else Op.SUB, out, t, span)
    return out


def shift_invariance(score: Expr, trace: list) -> tuple[Expr, Expr | None]:
    """Softmax over kv_idx is unchanged by adding a per-row value: additive terms of the score that mention
    neither ``kv_idx`` nor ``score`` drop out; their sum is returned as the lse shift."""
    terms = _terms(score)
    row = [(s, t) for s, t in terms if _row_only(t)]
    col = [(s, t) for s, t in terms if not _row_only(t)]
    if not row or not col:
        return score, None
    new = _sum(col, score.span)
    # the score keeps its type: a float stays a float (an int remainder of a float score would change it)
    if not (new.dtype is score.dtype or new.dtype is DType.FLOAT and score.dtype is not DType.INT):
        return score, None
    shift = _sum(row, score.span)
    trace.append("shift_invariance")
    return _span(score, new), shift


def simplify_variant(score: Expr, mask: Expr, sink: Expr | None = None, normalize: bool = True) -> Simplified:
    """Simplify a checked variant (typed ASTs from ``attnlang.check.check``, and its optional sink).

    Returns a ``Simplified`` whose score / mask / sink compute the same attention output, whose ``lse_shift`` (if
    any) added to the lse of the simplified variant gives the original lse, and whose trace lists the rules that
    fired. With ``normalize=False`` the output is the softmax's numerator, which a row term scales by exp(c): the
    shift rule does not apply then.
    """
    trace: list[str] = []
    if score.dtype is DType.INT:  # the score is a float (LANGUAGE.md), as the sink: score 1 is the score 1.0
        score = Call("float", (score,), score.span, DType.FLOAT)
    score = simplify(score, trace)
    mask = simplify(mask, trace)
    if sink is not None:
        if sink.dtype is DType.INT:  # the sink is a float logit (LANGUAGE.md): sink 0 is the sink 0.0
            sink = Call("float", (sink,), sink.span, DType.FLOAT)
        sink = simplify(sink, trace)
        if _is_neg_inf(sink):  # exp(-inf) adds nothing to the denominator
            sink = None
            trace.append("sink_neg_inf")
    score, lifted = lift_mask(score, mask, trace)
    if lifted is not mask:
        mask = simplify(lifted, trace)
    unshifted, sink_unshifted = score, sink
    shift = None
    if normalize:
        score, shift = shift_invariance(score, trace)
    if shift is not None:
        score = simplify(score, trace)
        shift = simplify(shift, trace)
        if isinstance(shift, Const) and shift.value == 0:
            shift = None  # a zero shift: nothing to add back (the score lost only a + 0)
        elif sink is not None:
            # in float: the sink is a float logit, and an int difference could leave int64
            c = shift if shift.dtype is not DType.INT else Call("float", (shift,), shift.span, DType.FLOAT)
            sink = simplify(mk_binary(Op.SUB, sink, c, sink.span), trace)
    return Simplified(score, mask, shift, tuple(trace), unshifted if shift is not None else None, sink,
                      sink_unshifted if shift is not None else None)
