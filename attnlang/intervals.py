"""Interval arithmetic over attnlang expressions: one table of operator rules (``RULES``) for every stage that
reasons about ranges.

- ``bounds(expr, env)``: scalar bounds in exact arithmetic (ints as Python ints), for the call checks (tensor-read
  bounds, int64 range, divisors), flex's int32 proofs and the finiteness of dropped row terms.
- ``apply(key, TENSOR, ctx(..., device=True), args)``: the same rules over tensors of bounds (one entry per block),
  for the block-sparsity analysis (attnlang.sparsity), covering what the backends compute in float32.
- ``decide(op, x, y, ops, margin)``: (always, sometimes) of a comparison, for both.

An ``Interval`` holds every value the expression can take when each name ranges over its interval in ``env``.
Booleans are intervals over {0, 1}: ``[1, 1]`` is always true, ``[0, 0]`` always false. Results are sound
(never too narrow); they are exact for sums and differences of independent names and monotone functions of them.
A float operation that can give NaN (``0 * inf``, ``inf % y``) gives TOP. Int bounds past int64 (an overflow error of
check.py) are capped at +-2**128. Soundness is tested in one place, tests/test_intervals.py.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Mapping

import torch

from .ast import Binary, Call, Const, DType, Expr, Index, Op, Unary, Var

__all__ = ["Interval", "bounds", "tensor_range", "TOP", "TRUE", "FALSE", "BOOL", "BlockKind", "RULES", "apply",
           "decide", "ctx", "SCALAR", "TENSOR"]


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


# ---------------------------------------------------------------------------------------------------------------
# One table of operator rules, for scalar bounds (checks, flex's int32 proofs, finite row terms) and for the
# block-sparsity analysis's per-block bounds (lo / hi tensors, one entry per block).
#
# A rule maps the bounds of its arguments to the bounds of its result. Bounds are a triple ``(lo, hi, nan)``:
# every value that is not NaN lies in [lo, hi], and ``nan`` says NaN can occur. ``lo`` / ``hi`` are Python numbers
# under SCALAR (ints stay exact Python ints) or broadcastable float64 tensors (or Python floats) under TENSOR; a rule
# is written once against the operations of ``ops`` and runs under both. ``ctx`` says what the result is and whose
# arithmetic the bounds must cover:
#   integer:   the result is an int (Python-sign // and %, 0 * inf counts as 0: an int's infinite bound is never met)
#   device:    the bounds must hold for what the backends compute in float32 (floor / ceil / int / // / % of a float
#              can land one step off, int() of a float past int64 gives any int, floats past float32's range
#              overflow to inf); False: exact arithmetic (the checks and the simplifier-facing scalar bounds)
#   arg_float: the (first) argument is a float (for floor, ceil, int)
# Adding an operator is one row of RULES (and, for an elementary function, its scalar and tensor spellings in
# _SCALAR_FUNCS / _TENSOR_FUNCS). Rows for the language's planned additions (LANGUAGE.md, issue 20) are here under
# the names the ast is expected to use: functions "erf", "cos", "sin" and int bit operations "bitand", "bitor",
# "bitxor", "lshift", "rshift" (keyed by name until ast.Op has members for them).

_INF = math.inf


@dataclass(frozen=True)
class Ctx:
    integer: bool = False
    device: bool = False
    arg_float: bool = False


_CTX: dict = {}


def ctx(integer: bool = False, device: bool = False, arg_float: bool = False) -> Ctx:
    """The (shared) Ctx for these flags."""
    key = (integer, device, arg_float)
    got = _CTX.get(key)
    if got is None:
        got = _CTX[key] = Ctx(*key)
    return got


def _sigmoid(v: float) -> float:
    if v >= 0:
        return 1.0 / (1.0 + math.exp(-v)) if v != math.inf else 1.0
    return math.exp(v) / (1.0 + math.exp(v)) if v != -math.inf else 0.0


def _scalar_fn(f):
    def g(v):
        try:
            return f(v)
        except (OverflowError, ValueError):
            return math.inf if v > 0 else -math.inf
    return g


_SCALAR_FUNCS = {
    "exp": _scalar_fn(math.exp), "exp2": _scalar_fn(lambda v: 2.0 ** v),
    "log": lambda v: -math.inf if v == 0 else math.log(v), "log2": lambda v: -math.inf if v == 0 else math.log2(v),
    "sqrt": math.sqrt, "tanh": math.tanh, "sigmoid": _sigmoid, "erf": math.erf,
    "floor": lambda v: math.floor(v) if math.isfinite(v) else v,
    "ceil": lambda v: math.ceil(v) if math.isfinite(v) else v,
    "sign": lambda v: (v > 0) - (v < 0), "float": float,
    "int": lambda v: math.trunc(v) if math.isfinite(v) else v,  # an exact Python int, like every int bound
    "cos": math.cos, "sin": math.sin,
}


class ScalarOps:
    """Bounds as Python numbers; ints exact. A NaN bound makes the whole result TOP (see ``_scalar_result``)."""

    tensor = False

    @staticmethod
    def t(x):
        return x

    minimum, maximum = staticmethod(min), staticmethod(max)

    @staticmethod
    def where(c, a, b):
        return a if c else b

    @staticmethod
    def any(c) -> bool:
        return bool(c)

    all = any

    @staticmethod
    def isinf(x) -> bool:
        return isinstance(x, float) and math.isinf(x)

    @staticmethod
    def finite(x) -> bool:
        return not isinstance(x, float) or math.isfinite(x)

    @staticmethod
    def point(lo, hi):
        """The value when lo == hi (a Python number), else None."""
        return lo if lo == hi else None

    @staticmethod
    def mul0(a, b):
        return 0 if a == 0 or b == 0 else a * b

    @staticmethod
    def div(a, b):
        try:
            return a / b
        except (OverflowError, ZeroDivisionError):
            return math.nan

    @staticmethod
    def floordiv(a, b):
        return a // b

    @staticmethod
    def pow(a, n):
        try:
            r = a ** n
        except (OverflowError, ZeroDivisionError):
            return math.nan
        return math.nan if isinstance(r, complex) else r

    @staticmethod
    def corners(vals):
        if any(v != v for v in vals):  # NaN
            return -_INF, _INF
        return min(vals), max(vals)

    @staticmethod
    def clean_lo(x):
        return -_INF if x != x else x

    @staticmethod
    def clean_hi(x):
        return _INF if x != x else x

    @staticmethod
    def fn(name, x):
        return _SCALAR_FUNCS[name](x)

    @staticmethod
    def floor(x):
        return math.floor(x) if ScalarOps.finite(x) else x

    @staticmethod
    def ceil(x):
        return math.ceil(x) if ScalarOps.finite(x) else x


def _tt(x):
    return x if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=torch.float64)


class TensorOps:
    """Bounds as float64 tensors (one entry per block, broadcastable) or Python floats; NaN bounds widen to inf."""

    tensor = True

    @staticmethod
    def t(x):
        return _tt(x)

    @staticmethod
    def minimum(a, b):
        if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
            return min(a, b)
        return torch.minimum(_tt(a).double(), _tt(b).double())

    @staticmethod
    def maximum(a, b):
        if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
            return max(a, b)
        return torch.maximum(_tt(a).double(), _tt(b).double())

    @staticmethod
    def where(c, a, b):
        if isinstance(c, bool):
            return a if c else b
        return torch.where(c, _tt(a).double(), _tt(b).double())

    @staticmethod
    def any(c) -> bool:
        return bool(c.any()) if isinstance(c, torch.Tensor) else bool(c)

    @staticmethod
    def all(c) -> bool:
        return bool(c.all()) if isinstance(c, torch.Tensor) else bool(c)

    @staticmethod
    def isinf(x):
        return torch.isinf(x) if isinstance(x, torch.Tensor) else math.isinf(x)

    @staticmethod
    def finite(x):
        return torch.isfinite(x) if isinstance(x, torch.Tensor) else math.isfinite(x)

    @staticmethod
    def point(lo, hi):
        if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
            return None  # a per-block value: rules that need one constant decline
        return lo if lo == hi else None

    @staticmethod
    def mul0(a, b):
        return torch.nan_to_num(_tt(a) * b, nan=0.0, posinf=_INF, neginf=-_INF)

    @staticmethod
    def div(a, b):
        return _tt(a) / b

    @staticmethod
    def floordiv(a, b):
        return torch.floor(_tt(a).double() / b)

    @staticmethod
    def pow(a, n):
        return _tt(a).double() ** n

    @staticmethod
    def corners(vals):
        lo = torch.minimum(torch.minimum(vals[0], vals[1]), torch.minimum(vals[2], vals[3])).double()
        hi = torch.maximum(torch.maximum(vals[0], vals[1]), torch.maximum(vals[2], vals[3])).double()
        return TensorOps.clean_lo(lo), TensorOps.clean_hi(hi)

    @staticmethod
    def clean_lo(x):
        x = _tt(x).double()
        return torch.where(torch.isnan(x), torch.tensor(-_INF, dtype=x.dtype, device=x.device), x)

    @staticmethod
    def clean_hi(x):
        x = _tt(x).double()
        return torch.where(torch.isnan(x), torch.tensor(_INF, dtype=x.dtype, device=x.device), x)

    @staticmethod
    def fn(name, x):
        if name == "float":
            return x
        return getattr(torch, _TENSOR_FUNCS[name])(_tt(x))

    @staticmethod
    def floor(x):
        return torch.floor(_tt(x))

    @staticmethod
    def ceil(x):
        return torch.ceil(_tt(x))


_TENSOR_FUNCS = {"exp": "exp", "exp2": "exp2", "log": "log", "log2": "log2", "sqrt": "sqrt", "tanh": "tanh",
                 "sigmoid": "sigmoid", "erf": "erf", "floor": "floor", "ceil": "ceil", "sign": "sign",
                 "int": "trunc", "cos": "cos", "sin": "sin"}

SCALAR, TENSOR = ScalarOps(), TensorOps()


def _top(nan: bool = True):
    return (-_INF, _INF, nan)


def _can_be(ops, lo, hi, v) -> bool:
    return ops.any((lo <= v) & (hi >= v)) if ops.tensor else lo <= v <= hi


def _has_pos_inf(ops, hi) -> bool:
    return ops.any(hi == _INF) if ops.tensor else hi == _INF


def _has_neg_inf(ops, lo) -> bool:
    return ops.any(lo == -_INF) if ops.tensor else lo == -_INF


def _infinite(ops, lo, hi) -> bool:
    return _has_neg_inf(ops, lo) or _has_pos_inf(ops, hi)


# ----- the rules: (ops, ctx, *argument bounds) -> result bounds -----

def _r_neg(ops, c, x):  # -[a, b] = [-b, -a]
    return (-x[1], -x[0], x[2])


def _r_add(ops, c, x, y):  # [a, b] + [c, d] = [a + c, b + d]; inf + -inf is NaN
    nan = x[2] or y[2]
    if not c.integer and ((_has_pos_inf(ops, x[1]) and _has_neg_inf(ops, y[0]))
                          or (_has_neg_inf(ops, x[0]) and _has_pos_inf(ops, y[1]))):
        nan = True
    return (ops.clean_lo(ops.t(x[0]) + y[0]), ops.clean_hi(ops.t(x[1]) + y[1]), nan)


def _r_sub(ops, c, x, y):  # x - y = x + (-y)
    return _r_add(ops, c, x, _r_neg(ops, c, y))


def _r_mul(ops, c, x, y):  # the corners; a float 0 * inf is NaN, an int's is 0 (its infinite bound is never met)
    nan = x[2] or y[2]
    if not c.integer and ((_can_be(ops, x[0], x[1], 0) and _infinite(ops, y[0], y[1]))
                          or (_can_be(ops, y[0], y[1], 0) and _infinite(ops, x[0], x[1]))):
        nan = True
    lo, hi = ops.corners([ops.mul0(a, b) for a in (x[0], x[1]) for b in (y[0], y[1])])
    return (lo, hi, nan)


def _zero_in(ops, y) -> bool:
    return _can_be(ops, y[0], y[1], 0)


def _r_truediv(ops, c, x, y):  # the corners, unless the divisor can be 0; inf / inf is NaN
    if _zero_in(ops, y):
        return _top(True)
    nan = x[2] or y[2] or (_infinite(ops, x[0], x[1]) and _infinite(ops, y[0], y[1]))
    lo, hi = ops.corners([ops.div(a, b) for a in (x[0], x[1]) for b in (y[0], y[1])])
    return (lo, hi, nan)


def _r_floordiv(ops, c, x, y):  # floor of the quotient's bounds; a float inf // y is NaN, x // inf is 0 or -1
    if _zero_in(ops, y):
        return _top(x[2] or y[2] or not c.integer)
    nan = x[2] or y[2]
    if not c.integer and (_infinite(ops, x[0], x[1]) or _infinite(ops, y[0], y[1])):
        if not ops.tensor:
            return _top(True)
        nan = True
    if c.integer and not ops.tensor and all(math.isfinite(v) for v in (x[0], x[1], y[0], y[1])):
        # exact Python ints: a float quotient rounds past 2**53 (and across an integer: (2**60 - 1) / 2**60 == 1.0)
        lo, hi = ops.corners([int(a) // int(b) for a in (x[0], x[1]) for b in (y[0], y[1])])
        return (lo, hi, nan)
    lo, hi = ops.corners([ops.div(a, b) for a in (x[0], x[1]) for b in (y[0], y[1])])
    lo, hi = ops.floor(lo), ops.floor(hi)
    if c.device and not c.integer:  # float32 quotients round across an integer
        lo, hi = lo - 1, hi + 1
    return (lo, hi, nan)


def _r_mod(ops, c, x, y):
    """Python's %: the divisor's sign, |r| < |divisor|. Exact where the dividend's range does not wrap: x % y == x
    for 0 <= x < y (and y < x <= 0), and x - q*y with one quotient q over the range for a constant int y."""
    nan = x[2] or y[2]
    if not c.integer and _infinite(ops, x[0], x[1]):
        if not ops.tensor:
            return _top(True)
        nan = True  # inf % y is NaN
    pos, neg = ops.all(y[0] > 0), ops.all(y[1] < 0)
    if not (pos or neg):
        return _top(True)
    step = 1 if c.integer else 0
    lo, hi = (0, y[1] - step) if pos else (y[0] + step, 0)
    if (c.device and not c.integer) or not (ops.all(ops.finite(x[0])) and ops.all(ops.finite(x[1]))):
        return (lo, hi, nan)  # (float32 rounds near the wrap point)
    d = y[0] if pos else y[1]  # the divisor nearest zero: one quotient for it is one quotient for all
    qlo, qhi = ops.floordiv(x[0], d), ops.floordiv(x[1], d)
    one = (qlo == qhi) if c.integer and ops.point(y[0], y[1]) is not None else (qlo == qhi) & (qlo == 0)
    if not ops.tensor:
        return (x[0] - qlo * d if qlo else x[0], x[1] - qlo * d if qlo else x[1], nan) if one else (lo, hi, nan)
    return (ops.where(one, x[0] - qlo * d, lo), ops.where(one, x[1] - qlo * d, hi), nan)


# Past int64 an int is an overflow error (check.py), whatever its size: exact int bounds are kept within
# +-_INT_CAP so that a huge power costs nothing and every bound still converts to a float.
_INT_CAP = 1 << 128


def _ipow(a: int, e: int) -> int:
    """a ** e for ints, e >= 0, without computing a huge power: beyond _INT_CAP it is _INT_CAP with the sign."""
    if abs(a) <= 1 or e * abs(a).bit_length() <= 130:
        return a ** e
    return _INT_CAP if a > 0 or e % 2 == 0 else -_INT_CAP


def _exact_int_pow(x, y):
    """int ** int on exact Python ints, exponent >= 0 (a negative one is an error of its own)."""
    if y[0] < 0 or not all(ScalarOps.finite(v) for v in (x[0], x[1], y[0], y[1])):
        return _top(False)
    a_lo, a_hi, e_lo, e_hi = int(x[0]), int(x[1]), int(y[0]), int(y[1])
    if e_lo == e_hi:
        if e_lo == 0:
            return (1, 1, False)
        vals = [_ipow(a, e_lo) for a in (a_lo, a_hi)]
        lo, hi = min(vals), max(vals)
        if e_lo % 2 == 0 and a_lo < 0 < a_hi:
            lo = 0
        return (lo, hi, False)
    if a_lo >= 0:  # monotone in the base; in the exponent too once the base is at least 1 (0 ** 0 == 1 is a corner)
        vals = [_ipow(a, e) for a in (a_lo, a_hi) for e in (e_lo, e_hi)]
        return (min(vals), max(vals), False)
    big = max(1, _ipow(max(-a_lo, abs(a_hi)), e_hi))  # a negative base: the sign alternates with the exponent
    return (-big, big, False)


def _r_pow(ops, c, x, y):
    """A constant exponent n >= 0: the corners (0 inside for even n); a float base > 0: the corners (inf ** 0 = 1);
    exact ints under SCALAR."""
    if c.integer and not ops.tensor:
        return _exact_int_pow(x, y)
    nan = x[2] or y[2]
    n = ops.point(y[0], y[1])
    if n is not None and math.isfinite(n) and float(n).is_integer() and n >= 0:
        n = int(n)
        if n == 0:
            return (1.0, 1.0, nan)
        xlo, xhi = (float(x[0]), float(x[1])) if not ops.tensor else (x[0], x[1])
        a, b = ops.pow(xlo, n), ops.pow(xhi, n)
        if not ops.tensor and (a != a or b != b):
            return _top(True)
        lo, hi = ops.minimum(a, b), ops.maximum(a, b)
        if n % 2 == 0:
            lo = ops.where((ops.t(x[0]) < 0) & (ops.t(x[1]) > 0) if ops.tensor else x[0] < 0 < x[1], 0.0, lo)
        return (ops.clean_lo(lo), ops.clean_hi(hi), nan)
    if not c.integer and ops.all(ops.t(x[0]) > 0 if ops.tensor else x[0] > 0):
        xs = (float(x[0]), float(x[1])) if not ops.tensor else (x[0], x[1])
        ys = (float(y[0]), float(y[1])) if not ops.tensor else (y[0], y[1])
        vals = [ops.pow(a, b) for a in xs for b in ys]
        lo, hi = ops.corners(vals if not ops.tensor else [ops.t(v) for v in vals])
        return (lo, hi, nan)
    return _top(True)


def _monotone(name: str, domain: float | None = None):
    """A non-decreasing function: its values at the ends (TOP below its domain)."""
    def rule(ops, c, x):
        if domain is not None and ops.any(x[0] < domain):
            return _top(True)
        lo, hi = ops.fn(name, x[0]), ops.fn(name, x[1])
        if c.device and c.arg_float and name in ("floor", "ceil", "int"):
            if name == "int":  # a float outside int64 (inf, NaN, 1e30) converts to whatever the device gives
                xlo, xhi = ops.t(x[0]).double(), ops.t(x[1]).double()
                wild = (xlo < -_INT64_EDGE) | (xhi >= _INT64_EDGE) | bool(x[2])
                lo = torch.where(wild, torch.tensor(-_INF, dtype=torch.float64), torch.trunc(xlo))
                hi = torch.where(wild, torch.tensor(_INF, dtype=torch.float64), torch.trunc(xhi))
                return (lo - 1, hi + 1, False)
            return (lo - 1, hi + 1, x[2])  # float32 lands one step off float64
        return (lo, hi, x[2])
    return rule


_INT64_EDGE = 2.0 ** 63


def _periodic(name: str):
    """cos / sin: [-1, 1], narrowed to the values at the ends (plus a float32 margin) when no maximum / minimum of
    the function lies between them."""
    top_at, bottom_at = (0.0, math.pi) if name == "cos" else (math.pi / 2, -math.pi / 2)
    two_pi, eps = 2 * math.pi, 1e-9

    def rule(ops, c, x):
        if _infinite(ops, x[0], x[1]):
            return (-1.0, 1.0, True)  # cos(inf) is NaN
        if _absmax(x[0], x[1]) > 2 ** 20:
            return (-1.0, 1.0, x[2])  # the argument's own rounding is a large part of a period past here
        lo_x, hi_x = (ops.t(x[0]).double(), ops.t(x[1]).double()) if ops.tensor else (float(x[0]), float(x[1]))
        a, b = ops.fn(name, lo_x), ops.fn(name, hi_x)

        def has(phase):  # some phase + 2 pi k in [lo_x, hi_x], give or take eps
            k = ops.ceil((lo_x - eps - phase) / two_pi)
            return phase + k * two_pi <= hi_x + eps

        m = 1e-6  # float32 cos / sin differ from float64 by about an ulp
        hi = ops.where(has(top_at), 1.0, ops.minimum(ops.maximum(a, b) + m, 1.0))
        lo = ops.where(has(bottom_at), -1.0, ops.maximum(ops.minimum(a, b) - m, -1.0))
        return (lo, hi, x[2])
    return rule


def _r_abs(ops, c, x):  # [a, b] when a >= 0; [-b, -a] when b <= 0; else [0, max(-a, b)]
    lo, hi = x[0], x[1]
    if not ops.tensor:
        if lo >= 0:
            return x
        if hi <= 0:
            return (-hi, -lo, x[2])
        return (0, max(-lo, hi), x[2])
    lo, hi = ops.t(lo), ops.t(hi)
    alo = torch.where(lo >= 0, lo, torch.where(hi <= 0, -hi, torch.zeros_like(lo)))
    return (alo, torch.maximum(lo.abs(), hi.abs()), x[2])


def _r_min(ops, c, x, y):
    return (ops.minimum(x[0], y[0]), ops.minimum(x[1], y[1]), x[2] or y[2])


def _r_max(ops, c, x, y):
    return (ops.maximum(x[0], y[0]), ops.maximum(x[1], y[1]), x[2] or y[2])


def _r_clamp(ops, c, x, lo, hi):  # min(max(x, lo), hi)
    return _r_min(ops, c, _r_max(ops, c, x, lo), hi)


def _r_identity(ops, c, x):
    return x


# ----- int bit operations (LANGUAGE.md, to be built) -----

def _bits(ops, *vals) -> int:
    """n with every value in [-2**n, 2**n - 1] (infinite: None)."""
    top = 0
    for v in vals:
        m = float(ops.t(v).abs().max()) if ops.tensor else abs(v)
        if not math.isfinite(m):
            return None
        top = max(top, int(m))
    return (top + 1).bit_length()


def _nonneg(ops, lo) -> bool:
    return ops.all(lo >= 0)


def _r_bitand(ops, c, x, y):  # x & y <= y for y >= 0 (a subset of its bits), and <= min(x, y) for both negative
    if _nonneg(ops, x[0]) and _nonneg(ops, y[0]):
        return (0, ops.minimum(x[1], y[1]), False)
    if _nonneg(ops, x[0]):
        return (0, x[1], False)
    if _nonneg(ops, y[0]):
        return (0, y[1], False)
    n = _bits(ops, x[0], x[1], y[0], y[1])
    return _top(False) if n is None else (-(1 << n), (1 << n) - 1, False)


def _r_bitor_xor(ops, c, x, y):  # both >= 0: [0 (max for |), 2**n - 1]; else within the common two's-complement width
    n = _bits(ops, x[0], x[1], y[0], y[1])
    if n is None:
        return _top(False)
    if _nonneg(ops, x[0]) and _nonneg(ops, y[0]):
        return (0, (1 << n) - 1, False)
    return (-(1 << n), (1 << n) - 1, False)


def _r_bitor(ops, c, x, y):
    lo, hi, nan = _r_bitor_xor(ops, c, x, y)
    if _nonneg(ops, x[0]) and _nonneg(ops, y[0]):  # x | y >= max(x, y) for non-negative ints
        lo = ops.maximum(x[0], y[0])
    return (lo, hi, nan)


def _shift_ok(ops, y) -> bool:
    return ops.all(y[0] >= 0) and ops.all(y[1] <= 63)


def _r_lshift(ops, c, x, y):  # x * 2**y: monotone in each argument for a fixed sign of x, so the corners
    if not _shift_ok(ops, y) or _infinite(ops, x[0], x[1]):
        return _top(False)
    if ops.tensor:
        vals = [ops.t(a).double() * torch.exp2(ops.t(b).double()) for a in (x[0], x[1]) for b in (y[0], y[1])]
    else:
        vals = [int(a) << int(b) for a in (x[0], x[1]) for b in (y[0], y[1])]
    lo, hi = ops.corners(vals)
    return (lo, hi, False)


def _r_rshift(ops, c, x, y):  # floor(x / 2**y): non-decreasing in x, monotone in y for a fixed sign of x
    if not _shift_ok(ops, y) or _infinite(ops, x[0], x[1]):
        return _top(False)
    if ops.tensor:
        vals = [torch.floor(ops.t(a).double() / torch.exp2(ops.t(b).double())) for a in (x[0], x[1])
                for b in (y[0], y[1])]
    else:
        vals = [int(a) >> int(b) for a in (x[0], x[1]) for b in (y[0], y[1])]
    lo, hi = ops.corners(vals)
    return (lo, hi, False)


RULES = {
    # key: rule(ops, ctx, *argument bounds) -> (lo, hi, nan)
    Op.NEG: _r_neg,            # -[a, b] = [-b, -a]
    Op.ADD: _r_add,            # [a + c, b + d]; inf + -inf is NaN
    Op.SUB: _r_sub,            # [a - d, b - c]
    Op.MUL: _r_mul,            # corners; float 0 * inf is NaN
    Op.TRUEDIV: _r_truediv,    # corners unless the divisor can be 0
    Op.FLOORDIV: _r_floordiv,  # floor of the quotient's corners (float32: one step wider)
    Op.MOD: _r_mod,            # Python's sign; exact where the range does not wrap
    Op.POW: _r_pow,            # constant exponents, positive bases; exact ints
    "exp": _monotone("exp"), "exp2": _monotone("exp2"), "log": _monotone("log", 0.0),
    "log2": _monotone("log2", 0.0), "sqrt": _monotone("sqrt", 0.0), "tanh": _monotone("tanh"),
    "sigmoid": _monotone("sigmoid"), "floor": _monotone("floor"), "ceil": _monotone("ceil"),
    "sign": _monotone("sign"), "int": _monotone("int"), "float": _monotone("float"),  # float(): same bounds
    "abs": _r_abs, "min": _r_min, "max": _r_max, "clamp": _r_clamp,
    "erf": _monotone("erf"), "cos": _periodic("cos"), "sin": _periodic("sin"),
    Op.BITAND: _r_bitand, Op.BITOR: _r_bitor, Op.XOR: _r_bitor_xor,   # int & | ^ (LANGUAGE.md, issue 20)
    Op.LSHIFT: _r_lshift, Op.RSHIFT: _r_rshift,                        # shifts by [0, 63]; else TOP
}


def apply(key, ops, c: Ctx, args):
    """The bounds of one operation (a RULES key) from its arguments' bounds."""
    r = RULES[key](ops, c, *args)
    if c.device and not c.integer and key is not Op.NEG:
        r = _f32_overflow(ops, r)
    return r


_F32_MAX = 3.4028234663852886e38


def _absmax(lo, hi) -> float:
    vals = []
    for v in (lo, hi):
        if isinstance(v, torch.Tensor):
            f = v[torch.isfinite(v)]
            vals.append(float(f.abs().max()) if f.numel() else 0.0)
        elif math.isfinite(v):
            vals.append(abs(v))
    return max(vals, default=0.0)


def _f32_overflow(ops, r):
    """A float the backends compute in float32 overflows to inf past float32's largest value (and inf can then
    make NaN): bounds beyond it become infinite, which later arithmetic treats as possibly NaN."""
    lo, hi, nan = r
    if _absmax(lo, hi) <= _F32_MAX:
        return r
    lo = torch.where(_tt(lo) < -_F32_MAX, -_INF, _tt(lo).double())
    hi = torch.where(_tt(hi) > _F32_MAX, _INF, _tt(hi).double())
    return (lo, hi, nan)


def decide(op: Op, x, y, ops, margin: float = 0.0):
    """(full, some) of the comparison ``x op y``: it holds for every pair / for some pair of values in the bounds.
    ``margin`` widens float comparisons by the rounding the backends may add; a side that may be NaN makes <, <=,
    ==, >, >= not always true and != possibly true."""
    xlo, xhi, xn = x
    ylo, yhi, yn = y
    if op in (Op.GT, Op.GE):
        op = Op.LT if op is Op.GT else Op.LE
        xlo, xhi, ylo, yhi = ylo, yhi, xlo, xhi
    m = margin
    if op is Op.LT:
        full, some = _lt(_add_m(xhi, m), ylo), _lt(_add_m(xlo, -m), yhi)
    elif op is Op.LE:
        full, some = _le(_add_m(xhi, m), ylo), _le(_add_m(xlo, -m), yhi)
    else:
        # equal everywhere only when both sides are the same single value: NaN stands for "not a point"
        all_equal = _eq(_point_or_nan(xlo, xhi), _point_or_nan(ylo, yhi)) if m == 0 else False
        if op is Op.EQ:
            full, some = all_equal, _and(_ge(_add_m(xhi, m), ylo), _ge(_add_m(yhi, m), xlo))
        else:
            full, some = _or_b(_lt(_add_m(xhi, m), ylo), _lt(_add_m(yhi, m), xlo)), _not(all_equal)
    if xn or yn:
        if op is Op.NE:
            some = True
        else:
            full = False
    return full, some


# ----- comparison helpers: operands are Python numbers or tensors -----

def _bool_op(fn, a, b):
    r = fn(a, b)
    return r if isinstance(r, torch.Tensor) else bool(r)


def _ge(a, b):
    return _bool_op(lambda x, y: x >= y, a, b)


def _gt(a, b):
    return _bool_op(lambda x, y: x > y, a, b)


def _le(a, b):
    return _bool_op(lambda x, y: x <= y, a, b)


def _lt(a, b):
    return _bool_op(lambda x, y: x < y, a, b)


def _eq(a, b):
    return _bool_op(lambda x, y: x == y, a, b)


def _and(a, b):
    if isinstance(a, bool) and isinstance(b, bool):
        return a and b
    if isinstance(a, bool):
        return b if a else False
    if isinstance(b, bool):
        return a if b else False
    return a & b


def _or_b(a, b):
    if isinstance(a, bool) and isinstance(b, bool):
        return a or b
    if isinstance(a, bool):
        return True if a else b
    if isinstance(b, bool):
        return True if b else a
    return a | b


def _not(a):
    return (not a) if isinstance(a, bool) else ~a


def _add_m(x, m):
    return x + m if m else x


def _point_or_nan(lo, hi):
    if not isinstance(lo, torch.Tensor) and not isinstance(hi, torch.Tensor):
        return lo if lo == hi else math.nan
    lo_t = _tt(lo).double()
    return torch.where(lo_t == _tt(hi), lo_t, torch.tensor(math.nan, dtype=torch.float64, device=lo_t.device))


# ----- scalar bounds of an expression -----

def _scalar_result(r) -> Interval:
    lo, hi, nan = r
    if nan or lo != lo or hi != hi:  # NaN possible: TOP (an Interval holds no NaN)
        return TOP
    return Interval(lo, hi)


def _b(x: Interval):
    return (x.lo, x.hi, False)


def bounds(expr: Expr, env: Env) -> Interval:
    """An interval holding every value of ``expr`` when each name takes any value of its interval in ``env``.

    Names absent from ``env`` are unbounded. A tensor's entry is an Interval of its values, or a callable
    ``(index_node, env) -> Interval`` for analyses that know more about the indices. Exact arithmetic (ints as
    Python ints); the operator rules are RULES, which the block-sparsity analysis runs over tensors of bounds.
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
        if expr.op is Op.NEG:
            return _saturate(_scalar_result(apply(Op.NEG, SCALAR, ctx(), [_b(x)])))
        return Interval(1 - x.hi, 1 - x.lo)
    if isinstance(expr, Call):
        return _saturate(_call(expr, env))
    return _saturate(_binary(expr, env))


def _binary(expr, env: Env) -> Interval:
    x, y = bounds(expr.left, env), bounds(expr.right, env)
    op = expr.op
    if op is Op.AND:
        return Interval(min(x.lo, y.lo), min(x.hi, y.hi))
    if op is Op.OR:
        return Interval(max(x.lo, y.lo), max(x.hi, y.hi))
    if op in RULES:
        integer = expr.dtype is DType.INT or _is_int(expr.left, expr.right)
        if op is Op.MUL and expr.left == expr.right:  # x * x is x ** 2 (never negative), not the corners' product
            return _scalar_result(apply(Op.POW, SCALAR, ctx(integer), [_b(x), _b(Interval(2, 2))]))
        return _scalar_result(apply(op, SCALAR, ctx(integer), [_b(x), _b(y)]))
    full, some = decide(op, _b(x), _b(y), SCALAR)
    return TRUE if full else FALSE if not some else BOOL


def _is_int(*nodes) -> bool:
    return all(getattr(n, "dtype", None) is DType.INT for n in nodes)


def _call(expr: Call, env: Env) -> Interval:
    f = expr.func
    if f == "where":
        # each branch's value under its condition: where(q_idx < 4, q_idx, 0) is in [0, 3]. Values only: an index
        # check of a read inside a branch still sees the whole range (kernels evaluate both branches everywhere)
        cond, a, b = expr.args
        c = bounds(cond, env)
        env_a = env if c == TRUE else _refine(cond, env, True) if c != FALSE else None
        env_b = env if c == FALSE else _refine(cond, env, False) if c != TRUE else None
        got = [bounds(x, e) for x, e in ((a, env_a), (b, env_b)) if e is not None]
        if not got:  # neither branch can be taken: no value (an empty range); stay sound with the plain join
            return bounds(a, env).join(bounds(b, env))
        return got[0] if len(got) == 1 else got[0].join(got[1])
    args = [bounds(a, env) for a in expr.args]
    if f in RULES:
        integer = expr.dtype is DType.INT
        return _scalar_result(apply(f, SCALAR, ctx(integer), [_b(a) for a in args]))
    return TOP


_FLIP = {Op.LT: Op.GT, Op.LE: Op.GE, Op.GT: Op.LT, Op.GE: Op.LE, Op.EQ: Op.EQ, Op.NE: Op.NE}
_NEGATE = {Op.LT: Op.GE, Op.LE: Op.GT, Op.GT: Op.LE, Op.GE: Op.LT, Op.EQ: Op.NE, Op.NE: Op.EQ}


def _refine(cond: Expr, env: Env, truth: bool) -> Env | None:
    """``env`` narrowed by knowing that ``cond`` is ``truth`` (None where that cannot hold). Narrows the int
    names (q_idx, kv_idx, b, h, ...: one value at a position, so every use in the branch agrees) compared with an
    int, through &, | and ~ (ints only: a float comparison with NaN is false both ways); anything else leaves
    ``env`` as it is (sound, not tight)."""
    if isinstance(cond, Unary) and cond.op is Op.NOT:
        return _refine(cond.operand, env, not truth)
    if isinstance(cond, Binary) and cond.dtype is DType.BOOL and cond.op in (Op.AND, Op.OR):
        if (cond.op is Op.AND) == truth:  # both hold: a & b true, or a | b false
            first = _refine(cond.left, env, truth)
            return None if first is None else _refine(cond.right, first, truth)
        return env  # one of them holds: nothing known of either alone
    if not (isinstance(cond, Binary) and cond.op in _FLIP):
        return env
    op = cond.op if truth else _NEGATE[cond.op]
    for var, other, o in ((cond.left, cond.right, op), (cond.right, cond.left, _FLIP[op])):
        if (isinstance(var, Var) and isinstance(env.get(var.name), Interval) and var.dtype is DType.INT
                and other.dtype is DType.INT):
            x, y = env[var.name], bounds(other, env)
            lo, hi = x.lo, x.hi
            if o is Op.LT:  # ints: x < y is x <= y - 1
                hi = min(hi, y.hi - 1)
            elif o is Op.LE:
                hi = min(hi, y.hi)
            elif o is Op.GT:
                lo = max(lo, y.lo + 1)
            elif o is Op.GE:
                lo = max(lo, y.lo)
            elif o is Op.EQ:
                lo, hi = max(lo, y.lo), min(hi, y.hi)
            if lo > hi:
                return None
            if (lo, hi) != (x.lo, x.hi):
                env = {**env, var.name: Interval(lo, hi)}
            return env
    return env


def _saturate(r: Interval) -> Interval:
    """Int bounds past int64 (an overflow error of check.py) are capped at +-2**128."""
    lo = max(-_INT_CAP, min(_INT_CAP, r.lo)) if isinstance(r.lo, int) else r.lo  # both ends: [1e300, 1e300] too
    hi = max(-_INT_CAP, min(_INT_CAP, r.hi)) if isinstance(r.hi, int) else r.hi
    return r if (lo, hi) == (r.lo, r.hi) else Interval(lo, hi)


def tensor_range(t) -> Interval:
    """The interval of a torch tensor's values (ints as exact Python ints, bools as 0/1; unbounded when it holds
    NaN; [0, 0] when empty)."""
    if t.numel() == 0:
        return Interval(0, 0)
    x = t.detach()
    if x.dtype == torch.bool:
        x = x.to(torch.int8)
    if not x.dtype.is_floating_point:  # exact Python ints: float() rounds int64 values past 2**53
        return Interval(int(x.min()), int(x.max()))
    lo, hi = float(x.min()), float(x.max())
    if math.isnan(lo) or math.isnan(hi):
        return TOP
    return Interval(lo, hi)
