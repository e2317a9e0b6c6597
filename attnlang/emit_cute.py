"""Typed AST -> CuTeDSL source for FlashAttention-4's ``score_mod``, ``score_mod_bwd`` and ``mask_mod``.

A printer: one ``_emit_<Node>`` method per node kind, found by one dispatcher; the spellings live in module-level
tables; what cannot be lowered raises ``Unsupported`` naming the node, so the fa4 backend declines the call and
"auto" falls back to flex. Pure Python: runs (and is golden-tested) on a machine without a GPU or CUTLASS.

Inside the kernel every value is a ``cute.TensorSSA`` of the kernel's vector width (1 when tensors are read):
FLOAT -> Float32, INT -> Int32, BOOL -> Boolean. Constants become ``cute.full_like`` of an index vector. Every
distinct subexpression is emitted once (common subexpressions share a temporary); constants are folded by the
simplifier before we see them. LANGUAGE.md semantics kept: ``//`` and ``%`` floor with Python's signs (the helper
corrects whichever rounding the DSL's ``//`` has), ``int()`` truncates (fptosi), ``/`` is true division.
Named tensors arrive as ``aux_tensors`` (sorted by name); ``q_len`` / ``kv_len`` come from ``seqlen_info``.

Varlen calls (``positions=VarlenPositions(...)``): FA4 hands the modifiers positions local to one packed sequence
(``q_idx`` / ``kv_idx`` from 0 at the sequence's start) and the sequence's index as ``b_idx``; the module adds the
sequence's start (``seqlen_info.offset_q`` / ``offset_k``, its row in the packed [total, H, D] tensors) minus its
batch row's start, so every expression still sees LANGUAGE.md's global ``b``, ``q_idx``, ``kv_idx``, and the call's
``q_len`` / ``kv_len`` (constants) instead of the sequence's lengths.

Signatures (flash_attn.cute 4.0.0b36):
    score_mod(score, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors) -> score'
    score_mod_bwd(grad, score, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors) -> grad * d score'/d score
    mask_mod(b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors) -> Boolean
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Mapping

from .ast import Binary, Call, Const, DType, Expr, Index, Op, Unary, Var, children, names_used
from .printer import to_source

__all__ = ["Unsupported", "CuteModule", "VarlenPositions", "emit_module", "EMITTER_VERSION"]

EMITTER_VERSION = "1"

_CUTE_TYPE = {DType.FLOAT: "cutlass.Float32", DType.INT: "cutlass.Int32", DType.BOOL: "cutlass.Boolean"}

# names the kernel hands to every modifier
_VAR_SPELLING = {"score": "score", "b": "b_idx", "h": "h_idx", "q_idx": "q_idx", "kv_idx": "kv_idx",
                 "q_len": "cute.full_like(kv_idx, seqlen_info.seqlen_q)",
                 "kv_len": "cute.full_like(kv_idx, seqlen_info.seqlen_k)"}
_ARITH = {Op.ADD: "({a} + {b})", Op.SUB: "({a} - {b})", Op.MUL: "({a} * {b})", Op.TRUEDIV: "({a} / {b})"}
_COMPARE = {Op.LT: "operator.lt", Op.LE: "operator.le", Op.GT: "operator.gt", Op.GE: "operator.ge",
            Op.EQ: "operator.eq", Op.NE: "operator.ne"}
_LOGIC = {Op.AND: "({a} & {b})", Op.OR: "({a} | {b})"}
# float functions: spelling with {x} and {fm} (the fastmath flag)
_FLOAT_FUNCS = {
    "exp": "cute.math.exp2({x} * _LOG2E, fastmath={fm})",   # exp(x) = 2^(x log2 e): the MUFU.EX2 path
    "exp2": "cute.math.exp2({x}, fastmath={fm})",
    # log / sqrt stay precise: they feed int() and bucket arithmetic (T5), where an ulp moves a boundary
    "log": "(cute.math.log2({x}) * _LN2)",
    "log2": "cute.math.log2({x})",
    "sqrt": "cute.math.sqrt({x})",
    "tanh": "cute.math.tanh({x}, fastmath={fm})",
    "sigmoid": "(_ONE / (_ONE + cute.math.exp2({x} * -_LOG2E, fastmath={fm})))".replace(
        "_ONE", "cute.full_like(kv_idx, 1.0, cutlass.Float32)"),
    "floor": "cute.math.floor({x})",
    "ceil": "cute.math.ceil({x})",
    # precise (the MUFU sin / cos approximations lose accuracy far from 0; erf has no MUFU path)
    "erf": "cute.math.erf({x})",
    "cos": "cute.math.cos({x})",
    "sin": "cute.math.sin({x})",
}
# integer bit operations on Int32 vectors; shifts (by a constant) are emitted as arithmetic in ``_shift``
_BITS = {Op.BITAND: "({a} & {b})", Op.BITOR: "({a} | {b})", Op.XOR: "({a} ^ {b})"}
# helpers emitted into a module only when used; plain functions: they run at trace time, inside the kernel's jit
_HELPERS = {
    "floordiv": '''
def _floordiv(a, b):
    """Python's floor division on Int32 vectors, whatever rounding the DSL's // has (trunc or floor)."""
    zero = cute.full_like(a, 0)
    q = a // b
    r = a - q * b
    fix = operator.ne(r, zero) & operator.ne(operator.lt(r, zero), operator.lt(b, zero))
    return cute.where(fix, q - cute.full_like(a, 1), q)
''',
    "mod": '''
def _mod(a, b):
    """Python's modulo on Int32 vectors: the sign of the divisor."""
    return a - _floordiv(a, b) * b
''',
    "gather": '''
def _gather(tensor, *indices):
    """tensor[indices] for vectors of width 1 (the kernel's width whenever tensors are read)."""
    coord = []
    for index in indices:
        frag = cute.make_rmem_tensor(1, cutlass.Int32)
        frag.store(index)
        coord.append(frag[0])
    value = cute.make_rmem_tensor(1, tensor.element_type)
    value[0] = tensor[coord[0] if len(coord) == 1 else tuple(coord)]
    return value.load()
''',
}
_HELPERS["table"] = '''
def _table(index, values, dtype):
    """values[index] for a small constant table, as a chain of selects (no memory access)."""
    out = cute.full_like(index, values[-1], dtype)
    for i in range(len(values) - 2, -1, -1):
        out = cute.where(operator.eq(index, cute.full_like(index, i)), cute.full_like(index, values[i], dtype), out)
    return out
'''
_HELPER_DEPS = {"mod": ("floordiv",)}


@dataclass(frozen=True)
class VarlenPositions:
    """The packing of a varlen call: batch rows of q_len queries and kv_len keys, concatenated row after row
    ([B * q_len, H, D]), each row cut into sequences that never cross a row boundary; batched: B > 1."""

    q_len: int
    kv_len: int
    batched: bool


class Unsupported(Exception):
    """A node this emitter cannot lower to CuTeDSL; the message names it."""


@dataclass(frozen=True)
class CuteModule:
    """One generated module.

    source: the Python text (a real module: written to the cache directory and imported).
    key: hex digest naming the module and, as ``__cute_hash__``, its functions in FA4's compile caches.
    functions: names defined, a subset of ("score_mod", "score_mod_bwd", "mask_mod").
    tensors: the named tensors in ``aux_tensors`` order.
    """

    source: str
    key: str
    functions: tuple[str, ...]
    tensors: tuple[str, ...]


def _float_literal(value: float) -> str:
    if math.isinf(value):
        return "math.inf" if value > 0 else "-math.inf"
    return repr(float(value))


class _Printer:
    """Emits the statements of one modifier's body; ``emit(node)`` returns the name holding its value."""

    def __init__(self, tensor_slots: Mapping[str, int], fastmath: bool, helpers: set, tables=None,
                 spelling: Mapping[str, str] | None = None):
        self.spelling = dict(_VAR_SPELLING if spelling is None else spelling)
        self.lines: list[str] = []
        self.memo: dict = {}
        self.slots = tensor_slots
        self.tables = tables or {}
        self.fastmath = fastmath
        self.helpers = helpers

    def emit(self, node: Expr) -> str:
        """Post-order without recursion; each distinct (node, dtype) becomes one temporary."""
        stack = [(node, False)]
        while stack:
            n, done = stack.pop()
            key = (n, n.dtype)
            if key in self.memo:
                continue
            if not done:
                stack.append((n, True))
                stack.extend((c, False) for c in reversed(children(n)))
                continue
            method = getattr(self, f"_emit_{type(n).__name__}", None)
            if method is None:
                raise Unsupported(f"no CuTeDSL lowering for {type(n).__name__} nodes")
            text = method(n)
            if isinstance(n, Const) or (isinstance(n, Var) and n.name in ("score", "b", "h", "q_idx", "kv_idx")):
                self.memo[key] = text  # constants and arguments are spelled inline: nothing to share
            else:
                name = f"t{len(self.lines)}"
                self.lines.append(f"{name} = {text}  # {to_source(n)[:60]}")
                self.memo[key] = name
        return self.memo[(node, node.dtype)]

    def value(self, node: Expr, as_type: DType) -> str:
        """The already-emitted value of ``node`` converted to ``as_type``."""
        if isinstance(node, Const) and node.dtype is not as_type and DType.BOOL not in (node.dtype, as_type):
            return self.const(float(node.value) if as_type is DType.FLOAT else int(node.value), as_type)
        name = self.memo[(node, node.dtype)]
        return self.cast(name, node.dtype, as_type)

    def cast(self, name: str, have: DType, want: DType) -> str:
        if have is want:
            return name
        if have is DType.BOOL:  # bool is never silently a number: only float(c) / int(c) get here
            one, zero = ("1.0", "0.0") if want is DType.FLOAT else ("1", "0")
            return (f"cute.where({name}, cute.full_like(kv_idx, {one}, {_CUTE_TYPE[want]}), "
                    f"cute.full_like(kv_idx, {zero}, {_CUTE_TYPE[want]}))")
        if want is DType.BOOL:
            raise Unsupported("a number used as a bool")
        return f"{name}.to({_CUTE_TYPE[want]})"

    def const(self, value, dtype: DType) -> str:
        if dtype is DType.FLOAT:
            return f"cute.full_like(kv_idx, {_float_literal(float(value))}, cutlass.Float32)"
        if dtype is DType.INT:
            if not -(1 << 31) <= int(value) < (1 << 31):
                raise Unsupported(f"integer constant {value} does not fit the kernel's 32-bit integers")
            return f"cute.full_like(kv_idx, {int(value)}, cutlass.Int32)"
        return f"operator.{'eq' if value else 'ne'}(kv_idx, kv_idx)"

    # ----- one method per node kind -----
    def _emit_Const(self, n: Const) -> str:
        return self.const(n.value, n.dtype)

    def _emit_Var(self, n: Var) -> str:
        if n.name not in self.spelling:
            raise Unsupported(f"unbound name {n.name!r}")
        return self.spelling[n.name]

    def _emit_Index(self, n: Index) -> str:
        if n.tensor in self.tables:
            return self._table_read(n)
        if n.tensor not in self.slots:
            raise Unsupported(f"tensor {n.tensor!r} has no aux slot")
        self.helpers.add("gather")
        idx = ", ".join(self.value(i, DType.INT) for i in n.indices)
        raw = f"_gather(aux_tensors[{self.slots[n.tensor]}], {idx})"
        if n.dtype is DType.BOOL:  # bool tensors travel as uint8
            return f"operator.ne({raw}.to(cutlass.Int32), cute.full_like(kv_idx, 0, cutlass.Int32))"
        return f"{raw}.to({_CUTE_TYPE[n.dtype]})"

    def _table_read(self, n: Index) -> str:
        """A read of a small tensor baked into the module: a select chain over the flat index. The index depends
        only on b and h, so the chain is the same for every score of a tile and the compiler computes it once."""
        shape, _ = self.tables[n.tensor]
        strides = [1] * len(shape)
        for axis in range(len(shape) - 2, -1, -1):
            strides[axis] = strides[axis + 1] * shape[axis + 1]
        terms = [self.value(i, DType.INT) if st == 1 else f"({self.value(i, DType.INT)} * {self.const(st, DType.INT)})"
                 for i, st in zip(n.indices, strides)]
        self.helpers.add("table")
        want = DType.INT if n.dtype is DType.BOOL else n.dtype
        read = f"_table({' + '.join(terms)}, _TABLE_{n.tensor}, {_CUTE_TYPE[want]})"
        if n.dtype is DType.BOOL:
            return f"operator.ne({read}, cute.full_like(kv_idx, 0, cutlass.Int32))"
        return read

    def _emit_Unary(self, n: Unary) -> str:
        x = self.value(n.operand, n.dtype)
        if n.op is Op.NOT:
            return f"operator.eq({x}, operator.ne(kv_idx, kv_idx))"  # x == False
        return f"({self.const(0, n.dtype)} - {x})"

    def _emit_Binary(self, n: Binary) -> str:
        op = n.op
        if op in _LOGIC:
            return _LOGIC[op].format(a=self.value(n.left, DType.BOOL), b=self.value(n.right, DType.BOOL))
        if op in _COMPARE:
            common = DType.FLOAT if DType.FLOAT in (n.left.dtype, n.right.dtype) else n.left.dtype
            if n.left.dtype is DType.BOOL and n.right.dtype is DType.BOOL:
                common = DType.BOOL
            return f"{_COMPARE[op]}({self.value(n.left, common)}, {self.value(n.right, common)})"
        a, b = self.value(n.left, n.dtype), self.value(n.right, n.dtype)
        if op is Op.TRUEDIV and self.fastmath and isinstance(n.right, Const) and float(n.right.value) != 0.0:
            # x / c -> x * (1 / c): one FMUL instead of IEEE division's refinement sequence (<= 1 ulp apart)
            return f"({a} * {self.const(1.0 / float(n.right.value), DType.FLOAT)})"
        if op in _ARITH:
            return _ARITH[op].format(a=a, b=b)
        if op is Op.FLOORDIV:
            if n.dtype is DType.FLOAT:
                return f"cute.math.floor({a} / {b})"
            self.helpers.add("floordiv")
            return f"_floordiv({a}, {b})"
        if op is Op.MOD:
            if n.dtype is DType.FLOAT:
                return f"({a} - cute.math.floor({a} / {b}) * {b})"
            self.helpers.update(("floordiv", "mod"))
            return f"_mod({a}, {b})"
        if op is Op.POW:
            return self._pow(n, a)
        if op in (Op.LSHIFT, Op.RSHIFT):
            if not (isinstance(n.right, Const) and 0 <= n.right.value <= 31):
                # a shift of an Int32 by 32 or more is undefined in the kernel (LLVM poison); int64 has 64 bits
                raise Unsupported(f"a shift by {to_source(n.right)}: the kernel shifts 32-bit ints by a constant in "
                                  f"[0, 31] only")
            return self._shift(op, a, int(n.right.value))
        if op in _BITS:
            return _BITS[op].format(a=a, b=b)
        raise Unsupported(f"operator {op.value!r}")

    def _shift(self, op: Op, a: str, c: int) -> str:
        """``a << c`` / ``a >> c`` (0 <= c <= 31) as multiplication / floor division by 2**c: the DSL's own
        shift operators on Int32 vectors fail to compile (H200, CUTLASS DSL 4.8.1: "Unsupported DSL type
        vector<1xi1>", benchmarks/results/gpu_suite_s4). ``>>`` is arithmetic (Python's floor); ``<<`` stays in
        int32 because the interval analysis keeps fa4's ints there. 2**31 is no Int32: c = 31 by its sign / bit."""
        if c == 0:
            return a
        if op is Op.RSHIFT:
            if c == 31:
                return f"cute.where(operator.lt({a}, {self.const(0, DType.INT)}), {self.const(-1, DType.INT)}, " \
                       f"{self.const(0, DType.INT)})"
            self.helpers.add("floordiv")
            return f"_floordiv({a}, {self.const(1 << c, DType.INT)})"
        if c == 31:
            odd = f"operator.ne(({a} & {self.const(1, DType.INT)}), {self.const(0, DType.INT)})"
            return f"cute.where({odd}, {self.const(-(1 << 31), DType.INT)}, {self.const(0, DType.INT)})"
        return f"({a} * {self.const(1 << c, DType.INT)})"

    def _pow(self, n: Binary, a: str) -> str:
        exp = n.right
        if not isinstance(exp, Const):
            raise Unsupported(f"'**' with a non-constant exponent ({to_source(exp)})")
        e = float(exp.value)
        if e == int(e) and abs(e) <= 16:  # repeated multiplication: exact like torch.pow for integer exponents
            k = abs(int(e))
            if k == 0:
                return self.const(1, n.dtype)
            prod = " * ".join([a] * k)
            if e > 0:
                return f"({prod})"
            if n.dtype is not DType.FLOAT:
                raise Unsupported("an integer raised to a negative power")
            return f"({self.const(1.0, DType.FLOAT)} / ({prod}))"
        if n.dtype is not DType.FLOAT:
            raise Unsupported("an integer raised to a large power")
        # x^e = 2^(e log2 x): NaN for x < 0 as torch.pow gives for a non-integer exponent
        return f"cute.math.exp2({self.const(e, DType.FLOAT)} * cute.math.log2({a}), fastmath={self.fastmath})"

    def _emit_Call(self, n: Call) -> str:
        f, args, dt = n.func, n.args, n.dtype
        if f == "where":
            cond, a, b = self.value(args[0], DType.BOOL), self.value(args[1], dt), self.value(args[2], dt)
            return f"cute.where({cond}, {a}, {b})"
        if f == "float":
            return self.value(args[0], DType.FLOAT)
        if f == "int":
            return self.value(args[0], DType.INT)  # fptosi: truncation toward zero, as int() in LANGUAGE.md
        if f in ("floor", "ceil") and dt is DType.INT:
            return self.value(args[0], DType.INT)
        if f in _FLOAT_FUNCS:
            return _FLOAT_FUNCS[f].format(x=self.value(args[0], DType.FLOAT), fm=self.fastmath)
        xs = [self.value(a, dt) for a in args]
        zero = self.const(0, dt)
        if f == "abs":
            return f"cute.where(operator.lt({xs[0]}, {zero}), {zero} - {xs[0]}, {xs[0]})"
        if f == "sign":
            one = self.const(1, dt)
            return (f"cute.where(operator.gt({xs[0]}, {zero}), {one}, "
                    f"cute.where(operator.lt({xs[0]}, {zero}), {zero} - {one}, {zero}))")
        if f == "min":
            return self._select(operator_name="le", a=xs[0], b=xs[1], dtype=dt)
        if f == "max":
            return self._select(operator_name="ge", a=xs[0], b=xs[1], dtype=dt)
        if f == "clamp":  # min(max(x, lo), hi), as lower_torch
            lo = self._select(operator_name="ge", a=xs[0], b=xs[1], dtype=dt)
            if dt is DType.FLOAT:  # a name for the inner select: it is read twice by the NaN test below
                name = f"t{len(self.lines)}"
                self.lines.append(f"{name} = {lo}  # max({to_source(args[0])[:40]}, lo)")
                lo = name
            return self._select(operator_name="le", a=lo, b=xs[2], dtype=dt)
        raise Unsupported(f"function {f!r}")

    def _select(self, operator_name: str, a: str, b: str, dtype: DType) -> str:
        """min (``le``) / max (``ge``) of two values as a select; for floats NaN-propagating like torch.minimum /
        maximum (and lower_torch): ``a`` is chosen when it is NaN, ``b`` when ``a <= b`` (``a >= b``) is False,
        so a NaN ``b`` is chosen too. fmin / fmax would drop the NaN. ``a`` is NaN exactly when ``a == a`` is
        False (an ordered comparison: this holds whatever predicate the DSL gives ``!=``)."""
        pick_a = f"operator.{operator_name}({a}, {b})"
        if dtype is DType.FLOAT:
            pick_a = f"({pick_a} | operator.eq(operator.eq({a}, {a}), operator.ne(kv_idx, kv_idx)))"
        return f"cute.where({pick_a}, {a}, {b})"


def _varlen_spelling(positions: VarlenPositions) -> dict:
    """Spellings of the built-in names for a varlen call (see the module docstring)."""
    row = "_row" if positions.batched else "cute.full_like(kv_idx, 0, cutlass.Int32)"
    return {**_VAR_SPELLING, "b": row, "q_idx": "(q_idx + _q0)", "kv_idx": "(kv_idx + _k0)",
            "q_len": f"cute.full_like(kv_idx, {int(positions.q_len)}, cutlass.Int32)",
            "kv_len": f"cute.full_like(kv_idx, {int(positions.kv_len)}, cutlass.Int32)"}


def _varlen_prologue(positions: VarlenPositions, used: set, helpers: set) -> list[str]:
    """The statements defining ``_row`` (the batch row of this sequence) and ``_q0`` / ``_k0`` (the global
    position of the sequence's first query / key) where the body uses them."""
    lines = []
    batched = positions.batched
    if batched and used & {"b", "q_idx", "kv_idx"}:
        helpers.add("floordiv")
        lines.append(f"_row = _floordiv(cute.full_like(kv_idx, seqlen_info.offset_q), "
                     f"cute.full_like(kv_idx, {int(positions.q_len)}, cutlass.Int32))  # batch row")
    for name, off, length in (("q_idx", "_q0", positions.q_len), ("kv_idx", "_k0", positions.kv_len)):
        if name in used:
            field = "offset_q" if name == "q_idx" else "offset_k"
            start = f"cute.full_like(kv_idx, seqlen_info.{field})"
            if batched:
                start = f"({start} - _row * cute.full_like(kv_idx, {int(length)}, cutlass.Int32))"
            lines.append(f"{off} = {start}  # global {name} of the sequence's first position")
    return lines


def _function(name: str, params: str, body: Expr, printer: _Printer, wrap=None,
              positions: VarlenPositions | None = None) -> list[str]:
    out = ["@cute.jit", f"def {name}({params}):"]
    if wrap is not None and isinstance(body, Const) and float(body.value) == 1.0:
        return out + ["    return grad"]  # d score'/d score == 1: the gradient passes through
    printer.emit(body)
    result = printer.value(body, body.dtype)
    if positions is not None:
        out += [f"    {line}" for line in _varlen_prologue(positions, names_used(body), printer.helpers)]
    out += [f"    {line}" for line in printer.lines]
    out.append(f"    return {wrap.format(result) if wrap else result}")
    return out


_SCORE_PARAMS = "score, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors"
_BWD_PARAMS = "grad, score, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors"
_MASK_PARAMS = "b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors"


def emit_module(score: Expr | None, mask: Expr | None, dscore: Expr | None, tensors: tuple[str, ...] = (),
                fastmath: bool = True, header: str = "", tables: Mapping[str, tuple] | None = None,
                positions: VarlenPositions | None = None) -> CuteModule:
    """CuTeDSL source for the modifiers of one variant.

    Args:
        score: the typed score expression, or None when the kernel needs no score_mod (identity).
        mask: the typed mask expression, or None when the kernel's own flags (or nothing) cover it.
        dscore: d(score)/d(score) from ``attnlang.diff.derivative``, or None for no score_mod_bwd.
        tensors: names of the tensors passed as aux_tensors, in that order.
        fastmath: use the approximate MUFU paths (tanh.approx, ex2.approx, lg2.approx).
        header: a comment placed at the top (e.g. the canonical variant), for readers of tracebacks.
        tables: small tensors baked into the module: name -> (shape, flat values); their reads become select
            chains instead of aux_tensors loads (for tensors indexed by b and h only: ``slope[h]``).
        positions: for FA4's varlen path, how the call is packed; the modifiers then turn the kernel's
            sequence-local positions into the global ones the expressions are written in. None: dense calls.
    Returns:
        a CuteModule whose ``key`` hashes the source (and the emitter version).
    Raises:
        Unsupported: a node the kernel cannot compute (message names it).
    """
    slots = {name: i for i, name in enumerate(tensors)}
    tables = dict(tables or {})
    helpers: set = set()
    bodies, functions = [], []
    spelling = None if positions is None else _varlen_spelling(positions)

    def printer():
        return _Printer(slots, fastmath, helpers, tables, spelling)

    if score is not None:
        bodies.append(_function("score_mod", _SCORE_PARAMS, score, printer(), positions=positions))
        functions.append("score_mod")
    if dscore is not None:
        bodies.append(_function("score_mod_bwd", _BWD_PARAMS, dscore, printer(), wrap="grad * {}",
                                positions=positions))
        functions.append("score_mod_bwd")
    if mask is not None:
        bodies.append(_function("mask_mod", _MASK_PARAMS, mask, printer(), positions=positions))
        functions.append("mask_mod")
    for h in list(helpers):
        helpers.update(_HELPER_DEPS.get(h, ()))
    lines = [f"# Generated by attnlang.emit_cute {EMITTER_VERSION}; do not edit. {header}".rstrip(),
             "import math", "import operator", "", "import cutlass", "import cutlass.cute as cute", "",
             f"_LOG2E = {math.log2(math.e)!r}", f"_LN2 = {math.log(2.0)!r}", f"TENSORS = {tuple(tensors)!r}"]
    for name, (shape, values) in sorted(tables.items()):
        lines.append(f"_TABLE_{name} = {tuple(values)!r}  # {name}, shape {tuple(shape)}")
    for name in ("floordiv", "mod", "gather", "table"):
        if name in helpers:
            lines += _HELPERS[name].rstrip("\n").split("\n")
    for body in bodies:
        lines += ["", ""] + body
    source = "\n".join(lines) + "\n"
    key = hashlib.sha256(source.encode()).hexdigest()[:32]
    tail = ["", ""] + [f"{fn}.__cute_hash__ = 'attnlang-{key}-{fn}'" for fn in functions]
    return CuteModule(source + "\n".join(tail) + "\n", key, tuple(functions), tuple(tensors))
