"""Interval arithmetic over attnlang expressions: one ``bounds(expr, env)`` for every stage that reasons about
ranges (the bounds check of tensor reads, the simplifier, the block-sparsity analysis).

An ``Interval`` holds every value the expression can take when each name ranges over its interval in ``env``.
Booleans are intervals over {0, 1}: ``[1, 1]`` is always true, ``[0, 0]`` always false. Results are sound
(never too narrow); they are exact for sums and differences of independent names and monotone functions of them.
A float operation that can give NaN (``0 * inf``, ``inf % y``) gives TOP. Int bounds past int64 (an overflow error of
check.py) are capped at +-2**128.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Callable, Mapping

from .ast import Call, Const, DType, Expr, Index, Op, Unary, Var

__all__ = ["Interval", "bounds", "tensor_range", "TOP", "TRUE", "FALSE", "BOOL", "BlockKind"]


class BlockKind(enum.IntEnum):
    """What a (query block, key block) tile of a mask holds: no allowed pair, some, or only allowed pairs."""

    EMPTY = 0
    PARTIAL = 1
    FULL = 2


@dataclass(frozen=True, slots=True)
class Interval:
    lo: float
    hi: float

    def __post_init__(self):
        if not (self.lo <= self.hi):  # also catches NaN
            raise ValueError(f"empty or NaN interval [{self.lo}, {self.hi}]")

    @property
    def is_point(self) -> bool:
        return self.lo == self.hi

    def contains(self, x: float) -> bool:
        return self.lo <= x <= self.hi

    def join(self, other: "Interval") -> "Interval":
        return Interval(min(self.lo, other.lo), max(self.hi, other.hi))

    def __repr__(self) -> str:
        return f"[{self.lo}, {self.hi}]"


TOP = Interval(-math.inf, math.inf)
TRUE = Interval(1, 1)
FALSE = Interval(0, 0)
BOOL = Interval(0, 1)

# Env: name -> Interval for built-ins; tensor name -> Interval of its values, or a callable taking the index
# node and the env (used by the sparsity analysis for per-block tensor summaries).
Env = Mapping[str, object]


def _safe(op: Callable[[float, float], float], a: float, b: float) -> float:
    try:
        r = op(a, b)
    except (OverflowError, ZeroDivisionError):
        return math.nan
    return r


def _corners(op, x: Interval, y: Interval) -> Interval:
    vals = [_safe(op, a, b) for a in (x.lo, x.hi) for b in (y.lo, y.hi)]
    if any(math.isnan(v) for v in vals):
        return TOP
    return Interval(min(vals), max(vals))


def _mul(a: float, b: float) -> float:
    if a == 0 or b == 0:  # 0 * inf counts as 0: an int's bound of inf is never reached
        return 0
    return a * b


def _fmul(a: float, b: float) -> float:
    # floats can hold inf, and 0 * inf is NaN: the corners give TOP then
    return math.nan if (a == 0 and math.isinf(b)) or (b == 0 and math.isinf(a)) else a * b


def _add(x: Interval, y: Interval) -> Interval:
    lo = x.lo + y.lo if not (math.isinf(x.lo) and math.isinf(y.lo) and x.lo != y.lo) else -math.inf
    hi = x.hi + y.hi if not (math.isinf(x.hi) and math.isinf(y.hi) and x.hi != y.hi) else math.inf
    return Interval(lo, hi)


def _neg(x: Interval) -> Interval:
    return Interval(-x.hi, -x.lo)


def _truediv(x: Interval, y: Interval) -> Interval:
    if y.lo <= 0 <= y.hi:
        return TOP
    return _corners(lambda a, b: a / b if not (math.isinf(a) and math.isinf(b)) else math.nan, x, y)


def _floordiv(x: Interval, y: Interval, integer: bool) -> Interval:
    if y.lo <= 0 <= y.hi:
        return TOP
    if not integer and not (_finite(x) and _finite(y)):
        return TOP  # inf // y is NaN, and x // inf is 0 or -1 by x's sign
    q = _truediv(x, y)
    return Interval(math.floor(q.lo) if math.isfinite(q.lo) else q.lo,
                    math.floor(q.hi) if math.isfinite(q.hi) else q.hi)


def _mod(x: Interval, y: Interval, integer: bool) -> Interval:
    # Python's sign convention: the result has the divisor's sign, |r| < |divisor|.
    if not integer and not _finite(x):
        return TOP  # inf % y is NaN
    if y.lo > 0:
        if x.lo >= 0 and x.hi < y.lo:  # x % y == x when 0 <= x < y
            return x
        top = y.hi - 1 if integer else y.hi
        return Interval(0, top)
    if y.hi < 0:
        if x.hi <= 0 and x.lo > y.hi:
            return x
        return Interval(y.lo + 1 if integer else y.lo, 0)
    return TOP


def _finite(x: Interval) -> bool:
    return -math.inf < x.lo and x.hi < math.inf


# Past int64 an int is an overflow error (check.py), whatever its size: int bounds are kept within +-_INT_CAP so that
# a huge power costs nothing and every bound still converts to a float.
_INT_CAP = 1 << 128


def _saturate(r: Interval) -> Interval:
    lo = -_INT_CAP if isinstance(r.lo, int) and r.lo < -_INT_CAP else r.lo
    hi = _INT_CAP if isinstance(r.hi, int) and r.hi > _INT_CAP else r.hi
    return r if (lo, hi) == (r.lo, r.hi) else Interval(lo, hi)


def _ipow(a: int, e: int) -> int:
    """a ** e for ints, e >= 0, without computing a huge power: beyond _INT_CAP it is _INT_CAP with the sign."""
    if abs(a) <= 1 or e * abs(a).bit_length() <= 130:
        return a ** e
    return _INT_CAP if a > 0 or e % 2 == 0 else -_INT_CAP


def _int_pow(x: Interval, y: Interval) -> Interval:
    """int ** int, exponent >= 0 (a negative one is an error of its own)."""
    if y.lo < 0 or not (_finite(x) and _finite(y)):
        return TOP
    a_lo, a_hi, e_lo, e_hi = int(x.lo), int(x.hi), int(y.lo), int(y.hi)
    if e_lo == e_hi:
        vals = [_ipow(a, e_lo) for a in (a_lo, a_hi)]
        lo, hi = min(vals), max(vals)
        if e_lo % 2 == 0 and a_lo < 0 < a_hi:
            lo = 0
        return Interval(lo, hi) if e_lo else Interval(1, 1)
    if a_lo >= 0:  # monotone in the base; in the exponent too once the base is at least 1 (0 ** 0 == 1 is a corner)
        vals = [_ipow(a, e) for a in (a_lo, a_hi) for e in (e_lo, e_hi)]
        return Interval(min(vals), max(vals))
    big = max(1, _ipow(max(-a_lo, abs(a_hi)), e_hi))  # a negative base: the sign alternates with the exponent
    return Interval(-big, big)


def _pow(x: Interval, y: Interval, integer: bool = False) -> Interval:
    if integer:
        return _int_pow(x, y)
    x, y = Interval(float(x.lo), float(x.hi)), Interval(float(y.lo), float(y.hi))  # float powers overflow to inf
    if y.is_point and float(y.lo).is_integer() and y.lo >= 0 and math.isfinite(y.lo):
        n = int(y.lo)
        if n == 0:
            return Interval(1, 1)
        vals = [_safe(lambda a, b: a ** b, v, n) for v in (x.lo, x.hi)]
        if any(isinstance(v, complex) or math.isnan(v) for v in vals):
            return TOP
        lo, hi = min(vals), max(vals)
        if n % 2 == 0 and x.lo < 0 < x.hi:
            lo = 0
        return Interval(lo, hi)
    if x.lo > 0:
        r = _corners(lambda a, b: a ** b if not (a == math.inf and b == 0) else 1.0, x, y)
        return r
    return TOP


def _monotone(f: Callable[[float], float], x: Interval, domain_lo: float = -math.inf) -> Interval:
    if x.lo < domain_lo:
        return TOP

    def g(v):
        try:
            return f(v)
        except (OverflowError, ValueError):
            return math.inf if v > 0 else -math.inf
    return Interval(g(x.lo), g(x.hi))


def _log(v: float) -> float:
    return -math.inf if v == 0 else math.log(v)


def _log2(v: float) -> float:
    return -math.inf if v == 0 else math.log2(v)


def _sigmoid(v: float) -> float:
    if v >= 0:
        return 1.0 / (1.0 + math.exp(-v)) if v != math.inf else 1.0
    return math.exp(v) / (1.0 + math.exp(v)) if v != -math.inf else 0.0


_UNARY_MONOTONE = {
    "exp": (math.exp, -math.inf), "exp2": (lambda v: 2.0 ** v, -math.inf), "log": (_log, 0.0),
    "log2": (_log2, 0.0), "sqrt": (math.sqrt, 0.0), "tanh": (math.tanh, -math.inf),
    "sigmoid": (_sigmoid, -math.inf),
    "floor": (lambda v: math.floor(v) if math.isfinite(v) else v, -math.inf),
    "ceil": (lambda v: math.ceil(v) if math.isfinite(v) else v, -math.inf),
    "sign": (lambda v: (v > 0) - (v < 0), -math.inf), "float": (float, -math.inf),
}


def _compare(op: Op, x: Interval, y: Interval) -> Interval:
    if op is Op.LT:
        return TRUE if x.hi < y.lo else FALSE if x.lo >= y.hi else BOOL
    if op is Op.LE:
        return TRUE if x.hi <= y.lo else FALSE if x.lo > y.hi else BOOL
    if op is Op.GT:
        return _compare(Op.LT, y, x)
    if op is Op.GE:
        return _compare(Op.LE, y, x)
    if op is Op.EQ:
        if x.is_point and y.is_point and x.lo == y.lo:
            return TRUE
        return FALSE if (x.hi < y.lo or y.hi < x.lo) else BOOL
    eq = _compare(Op.EQ, x, y)
    return Interval(1 - eq.hi, 1 - eq.lo)


def bounds(expr: Expr, env: Env) -> Interval:
    """An interval holding every value of ``expr`` when each name takes any value of its interval in ``env``.

    Names absent from ``env`` are unbounded. A tensor's entry is an Interval of its values, or a callable
    ``(index_node, env) -> Interval`` for analyses that know more about the indices.
    """
    if isinstance(expr, Const):
        v = float(expr.value) if expr.dtype is not DType.INT else expr.value
        return Interval(v, v)
    if isinstance(expr, Var):
        got = env.get(expr.name)
        return got if isinstance(got, Interval) else TOP
    if isinstance(expr, Index):
        got = env.get(expr.tensor)
        if callable(got):
            return got(expr, env)
        return got if isinstance(got, Interval) else TOP
    if isinstance(expr, Unary):
        x = bounds(expr.operand, env)
        return _saturate(_neg(x)) if expr.op is Op.NEG else Interval(1 - x.hi, 1 - x.lo)
    if isinstance(expr, Call):
        return _saturate(_call(expr, env))
    return _saturate(_binary(expr, env))


def _binary(expr, env: Env) -> Interval:
    x, y = bounds(expr.left, env), bounds(expr.right, env)
    op = expr.op
    integer = expr.dtype is DType.INT or _is_int(expr.left, expr.right)
    if op is Op.ADD:
        return _add(x, y)
    if op is Op.SUB:
        return _add(x, _neg(y))
    if op is Op.MUL:
        return _corners(_mul if integer else _fmul, x, y)
    if op is Op.TRUEDIV:
        return _truediv(x, y)
    if op is Op.FLOORDIV:
        return _floordiv(x, y, integer)
    if op is Op.MOD:
        return _mod(x, y, integer)
    if op is Op.POW:
        return _pow(x, y, integer)
    if op is Op.AND:
        return Interval(min(x.lo, y.lo), min(x.hi, y.hi))
    if op is Op.OR:
        return Interval(max(x.lo, y.lo), max(x.hi, y.hi))
    return _compare(op, x, y)


def _is_int(*nodes) -> bool:
    return all(getattr(n, "dtype", None) is DType.INT for n in nodes)


def _call(expr: Call, env: Env) -> Interval:
    f, args = expr.func, [bounds(a, env) for a in expr.args]
    if f in _UNARY_MONOTONE:
        fn, domain_lo = _UNARY_MONOTONE[f]
        return _monotone(fn, args[0], domain_lo)
    if f == "int":  # truncation toward zero is monotone (non-decreasing)
        return _monotone(lambda v: float(math.trunc(v)) if math.isfinite(v) else v, args[0])
    if f == "abs":
        x = args[0]
        if x.lo >= 0:
            return x
        if x.hi <= 0:
            return _neg(x)
        return Interval(0, max(-x.lo, x.hi))
    if f == "min":
        return Interval(min(args[0].lo, args[1].lo), min(args[0].hi, args[1].hi))
    if f == "max":
        return Interval(max(args[0].lo, args[1].lo), max(args[0].hi, args[1].hi))
    if f == "clamp":  # min(max(x, lo), hi)
        x, lo, hi = args
        m = Interval(max(x.lo, lo.lo), max(x.hi, lo.hi))
        return Interval(min(m.lo, hi.lo), min(m.hi, hi.hi))
    if f == "where":
        c, a, b = args
        if c == TRUE:
            return a
        if c == FALSE:
            return b
        return a.join(b)
    return TOP



def tensor_range(t) -> Interval:
    """The interval of a torch tensor's values (bools as 0/1; unbounded when it holds NaN; [0, 0] when empty)."""
    import torch
    if t.numel() == 0:
        return Interval(0, 0)
    x = t.detach()
    if x.dtype == torch.bool:
        x = x.to(torch.int8)
    lo, hi = float(x.min()), float(x.max())
    if math.isnan(lo) or math.isnan(hi):
        return TOP
    return Interval(lo, hi)
