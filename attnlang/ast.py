"""The typed, immutable AST of attnlang expressions.

Every node is a frozen, slotted dataclass. ``span`` (where the node came from in the source) and ``dtype``
(filled in by the checker) never take part in equality or hashing: two nodes are equal when they spell the same
expression. ``Const`` is the exception for ``dtype``: ``True``, ``1`` and ``1.0`` are different constants.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace
from typing import Iterator, Union

__all__ = [
    "DType", "Op", "Span", "Expr", "Const", "Var", "Index", "Call", "Unary", "Binary", "Binding", "Let", "Reduce",
    "BUILTIN_VARS", "FUNCTIONS", "REDUCTIONS", "COMPARISONS", "ARITHMETIC", "LOGICAL", "BITWISE",
    "children", "with_children", "walk", "depth", "tensor_reads", "names_used", "const",
]


class DType(enum.Enum):
    """Element type of an expression. ``UNKNOWN`` is a tensor read whose dtype is only known at call time."""

    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    UNKNOWN = "unknown"

    def __repr__(self) -> str:
        return f"DType.{self.name}"


class Op(enum.Enum):
    ADD = "+"
    SUB = "-"
    MUL = "*"
    TRUEDIV = "/"
    FLOORDIV = "//"
    MOD = "%"
    POW = "**"
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    EQ = "=="
    NE = "!="
    AND = "&"
    OR = "|"
    NEG = "-u"
    NOT = "~"
    # integer bit operations; `&` and `|` are parsed as AND / OR and become BITAND / BITOR when the checker sees
    # int operands, so a stage that knows only the logical meaning never meets an int under AND / OR
    BITAND = "&i"
    BITOR = "|i"
    XOR = "^"
    LSHIFT = "<<"
    RSHIFT = ">>"

    def __repr__(self) -> str:
        return f"Op.{self.name}"


ARITHMETIC = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.TRUEDIV, Op.FLOORDIV, Op.MOD, Op.POW})
COMPARISONS = frozenset({Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE})
MIRRORED = {Op.LT: Op.GT, Op.LE: Op.GE, Op.GT: Op.LT, Op.GE: Op.LE, Op.EQ: Op.EQ, Op.NE: Op.NE}  # a OP b == b OP' a
NEGATED = {Op.LT: Op.GE, Op.LE: Op.GT, Op.GT: Op.LE, Op.GE: Op.LT, Op.EQ: Op.NE, Op.NE: Op.EQ}   # ~(a OP b), ints
LOGICAL = frozenset({Op.AND, Op.OR})
BITWISE = frozenset({Op.BITAND, Op.BITOR, Op.XOR, Op.LSHIFT, Op.RSHIFT})

# Built-in integer names and the float `score`; everything else is bound by name.
BUILTIN_VARS = {
    "score": DType.FLOAT,
    "b": DType.INT,
    "h": DType.INT,
    "q_idx": DType.INT,
    "kv_idx": DType.INT,
    "q_len": DType.INT,
    "kv_len": DType.INT,
}

# function name -> number of arguments
FUNCTIONS = {
    "where": 3, "abs": 1, "min": 2, "max": 2, "clamp": 3,
    "exp": 1, "exp2": 1, "log": 1, "log2": 1, "sqrt": 1, "tanh": 1, "sigmoid": 1,
    "floor": 1, "ceil": 1, "sign": 1, "float": 1, "int": 1,
    "erf": 1, "cos": 1, "sin": 1,
}

# functions that also take a generator over a range fixed at compile time: ``sum(e for i in range(K))``
REDUCTIONS = ("sum", "any", "all", "max", "min")


@dataclass(frozen=True, slots=True)
class Span:
    """1-based line and column of the first character, and 0-based character offsets [start, end)."""

    line: int
    column: int
    start: int
    end: int


_SPAN = dict(default=None, compare=False, hash=False, repr=False)
_DTYPE = dict(default=None, compare=False, hash=False, repr=False)


@dataclass(frozen=True, slots=True)
class Const:
    """A literal: ``42`` (INT), ``0.5`` / ``inf`` (FLOAT), ``True`` (BOOL)."""

    value: Union[int, float, bool]
    dtype: DType
    span: Span | None = field(**_SPAN)


@dataclass(frozen=True, slots=True)
class Var:
    """A built-in name (``score``, ``b``, ``h``, ``q_idx``, ``kv_idx``, ``q_len``, ``kv_len``) or, before
    checking, a scalar parameter (the checker replaces those by constants)."""

    name: str
    span: Span | None = field(**_SPAN)
    dtype: DType | None = field(**_DTYPE)


@dataclass(frozen=True, slots=True)
class Index:
    """A read of a tensor bound by name at call time: ``tensor[indices...]``."""

    tensor: str
    indices: tuple
    span: Span | None = field(**_SPAN)
    dtype: DType | None = field(**_DTYPE)


@dataclass(frozen=True, slots=True)
class Call:
    """A built-in function applied to arguments, e.g. ``where(c, a, b)``."""

    func: str
    args: tuple
    span: Span | None = field(**_SPAN)
    dtype: DType | None = field(**_DTYPE)


@dataclass(frozen=True, slots=True)
class Unary:
    """``-x`` (Op.NEG) or ``~x`` (Op.NOT)."""

    op: Op
    operand: "Expr"
    span: Span | None = field(**_SPAN)
    dtype: DType | None = field(**_DTYPE)


@dataclass(frozen=True, slots=True)
class Binary:
    """Arithmetic, a single comparison, or ``&`` / ``|``. Chained comparisons are parsed into ``&`` of pairs.
    word: written as the word ``and`` / ``or`` (logic on bools only; the checker refuses ints), not ``&`` / ``|``.
    of_sum: one of the ``+`` a ``sum(... for i in range(K))`` expands to (its type errors name sum(), not '+')."""

    op: Op
    left: "Expr"
    right: "Expr"
    span: Span | None = field(**_SPAN)
    dtype: DType | None = field(**_DTYPE)
    word: bool = field(default=False, compare=False, hash=False, repr=False)
    of_sum: bool = field(default=False, compare=False, hash=False, repr=False)


@dataclass(frozen=True, slots=True)
class Binding:
    """``name = value`` at the head of an expression. span: the name's token. Only the parser and the checker see
    bindings: the checker substitutes every bound name by its (typed) value."""

    name: str
    value: "Expr"
    span: Span | None = field(**_SPAN)
    end: int | None = field(default=None, compare=False, hash=False, repr=False)  # offset after its ';' / new line


@dataclass(frozen=True, slots=True)
class Let:
    """Bindings followed by the result: ``qb = q_idx // bs; kb = kv_idx // bs; qb >= kb``. Checker-only."""

    bindings: tuple
    body: "Expr"
    span: Span | None = field(**_SPAN)
    dtype: DType | None = field(**_DTYPE)


@dataclass(frozen=True, slots=True)
class Reduce:
    """``func(body for var in range(count))``, func one of REDUCTIONS. Checker-only: the checker unrolls it into
    ordinary nodes (count is a compile-time int). var_span: the variable's token after ``for``."""

    func: str
    body: "Expr"
    var: str
    count: "Expr"
    span: Span | None = field(**_SPAN)
    var_span: Span | None = field(**_SPAN)
    dtype: DType | None = field(**_DTYPE)


Expr = Union[Const, Var, Index, Call, Unary, Binary, Let, Reduce]


def const(value) -> Const:
    """A constant of the dtype Python's type gives (bool before int: ``True`` is a BOOL)."""
    if isinstance(value, bool):
        return Const(value, DType.BOOL)
    if isinstance(value, int):
        return Const(value, DType.INT)
    value = float(value)
    if math.isnan(value):
        raise ValueError("attnlang has no NaN constant")
    return Const(value, DType.FLOAT)


def children(node: Expr) -> tuple:
    if isinstance(node, (Const, Var)):
        return ()
    if isinstance(node, Index):
        return node.indices
    if isinstance(node, Call):
        return node.args
    if isinstance(node, Unary):
        return (node.operand,)
    if isinstance(node, Let):
        return tuple(b.value for b in node.bindings) + (node.body,)
    if isinstance(node, Reduce):
        return (node.count, node.body)
    return (node.left, node.right)


def with_children(node: Expr, new: tuple, dtype: DType | None = None) -> Expr:
    """A copy of ``node`` with other children (and, if given, another dtype); span kept."""
    dtype = node.dtype if dtype is None else dtype
    if isinstance(node, Const):
        return node
    if isinstance(node, Var):
        return replace(node, dtype=dtype)
    if isinstance(node, Index):
        return replace(node, indices=tuple(new), dtype=dtype)
    if isinstance(node, Call):
        return replace(node, args=tuple(new), dtype=dtype)
    if isinstance(node, Unary):
        return replace(node, operand=new[0], dtype=dtype)
    if isinstance(node, Let):
        bindings = tuple(replace(b, value=v) for b, v in zip(node.bindings, new))
        return replace(node, bindings=bindings, body=new[-1], dtype=dtype)
    if isinstance(node, Reduce):
        return replace(node, count=new[0], body=new[1], dtype=dtype)
    return replace(node, left=new[0], right=new[1], dtype=dtype)


def walk(node: Expr) -> Iterator[Expr]:
    """Every node, pre-order, without recursion (expressions can be long)."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(reversed(children(n)))


def depth(node: Expr) -> int:
    """Nesting depth, computed without recursion."""
    best, stack = 0, [(node, 1)]
    while stack:
        n, d = stack.pop()
        best = max(best, d)
        stack.extend((c, d + 1) for c in children(n))
    return best


def tensor_reads(node: Expr) -> list[Index]:
    return [n for n in walk(node) if isinstance(n, Index)]


def names_used(node: Expr) -> set[str]:
    """Every name the expression mentions: built-ins, parameters and tensors."""
    out = set()
    for n in walk(node):
        if isinstance(n, Var):
            out.add(n.name)
        elif isinstance(n, Index):
            out.add(n.tensor)
    return out
