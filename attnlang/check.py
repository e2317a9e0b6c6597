"""Names and types: untyped AST -> typed AST, every error of LANGUAGE.md as an AttnLangError with a caret.

Two passes share one type rule table (``_infer``):
- ``check(score, mask, params)`` at compile time: names resolved, scalar parameters substituted as constants,
  tensor element types still UNKNOWN (they are known only at call time);
- ``bind(checked, tensor_dtypes)`` at call time: the same rules with the tensors' element types, so every node
  gets INT, FLOAT or BOOL and the backends never derive a type themselves.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Mapping

from .ast import (
    ARITHMETIC,
    BUILTIN_VARS,
    COMPARISONS,
    FUNCTIONS,
    LOGICAL,
    REDUCTIONS,
    Binary,
    Call,
    Const,
    DType,
    Expr,
    Index,
    Let,
    Op,
    Reduce,
    Unary,
    Var,
    children,
    const,
    names_used,
    walk,
    with_children,
)
from .errors import AttnLangError
from .intervals import TOP, Interval, bounds
from .parse import MAX_DEPTH, parse

__all__ = ["Checked", "check", "bind", "check_index_bounds", "check_float_range", "check_named_tensor",
           "CALL_KEYWORDS", "RESERVED_NAMES", "dtype_of_torch", "MAX_TERMS", "MAX_NODES"]

# Keywords of Variant.__call__ and al.reference; they can never name a scalar or a tensor.
CALL_KEYWORDS = ("scale", "backend", "return_lse", "kernel_options")
# the reductions (sum, any, all) and range are function names too (LANGUAGE.md: no function name names a scalar
# or a tensor), as they are for bindings
RESERVED_NAMES = frozenset(CALL_KEYWORDS) | frozenset(FUNCTIONS) | frozenset(REDUCTIONS) | frozenset(BUILTIN_VARS) | {
    "range", "True", "False", "inf", "and", "or", "not", "for", "in"}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

_NUMERIC = (DType.INT, DType.FLOAT, DType.UNKNOWN)
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1  # ints are evaluated as torch.int64
_FLOAT_FUNCS = frozenset({"exp", "exp2", "log", "log2", "sqrt", "tanh", "sigmoid", "erf", "cos", "sin"})
MAX_TERMS = 4096     # terms of one reduction `sum(... for i in range(K))`
MAX_NODES = 20_000   # nodes of an expression once its bindings and reductions are expanded
_SAME_TYPE_FUNCS = frozenset({"abs", "floor", "ceil", "sign"})


@dataclass(frozen=True)
class Checked:
    """A checked pair of expressions, and the optional sink.

    score, mask: typed ASTs (parameters substituted; tensor reads UNKNOWN until ``bind``).
    tensors: name -> number of indices of every tensor the expressions read.
    sources: {"score": text, "mask": text} (and "sink" when there is one), for error carets.
    sink: the typed sink expression (LANGUAGE.md: the logit of one extra key per row), or None.
    unused: where -> the typed values of bindings its result never uses: they compute nothing, but a binding means
        what Python's does, so their reads and divisions are checked as the others' (``x = doc[q_idx + 100]; True``
        is an index error, not a variant that needs doc and never looks at it).
    """

    score: Expr
    mask: Expr
    tensors: Mapping[str, int]
    sources: Mapping[str, str] = field(compare=False)
    sink: Expr | None = None
    unused: Mapping[str, tuple] = field(default_factory=dict, compare=False)

    def expr(self, where: str) -> Expr:
        return self.sink if where == "sink" else self.score if where == "score" else self.mask

    @property
    def wheres(self) -> tuple[str, ...]:
        """The expressions present: ("score", "mask") and "sink" when there is one."""
        return ("score", "mask") if self.sink is None else ("score", "mask", "sink")

    def checked_trees(self):
        """(where, tree) of each expression, then of each unused binding's value: what the call checks read."""
        for where in self.wheres:
            yield where, self.expr(where)
        for where, values in self.unused.items():
            for value in values:
                yield where, value


def dtype_of_torch(t) -> DType | None:
    """The attnlang element type of a torch dtype, or None when attnlang cannot read it."""
    import torch
    if t == torch.bool:
        return DType.BOOL
    if t.is_floating_point:
        return DType.FLOAT
    if t.is_complex:
        return None
    return DType.INT


def check_named_tensor(name: str, t, wanted: Mapping[str, int], device=None) -> None:
    """Raise AttnLangError unless ``t`` can be bound to ``name``: a tensor the expressions read (``wanted``: name
    -> number of indices), of a dtype and layout attnlang reads, on ``device`` (q's, for a call; any for
    ``block_sparsity``) and not on the meta device, with as many dimensions as the expressions index."""
    import torch
    if name not in wanted:
        used = ", ".join(sorted(wanted)) or "none"
        raise AttnLangError(f"tensor {name!r} is given but neither expression reads it (tensors read: {used})")
    if not isinstance(t, torch.Tensor):
        raise AttnLangError(f"tensor {name!r} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_nested or t.layout != torch.strided:
        raise AttnLangError(f"tensor {name!r} has layout {'nested' if t.is_nested else t.layout}; attnlang reads "
                            f"dense (strided) tensors")
    readable = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                torch.bfloat16, torch.float32, torch.float64)
    if t.is_quantized or t.dtype not in readable:
        raise AttnLangError(f"tensor {name!r} has dtype {t.dtype}; attnlang reads bool, uint8, int8/16/32/64 and "
                            f"float16/bfloat16/32/64 tensors")
    if device is not None and t.device != device:
        raise AttnLangError(f"tensor {name!r} is on {t.device} but q is on {device}")
    if t.device.type == "meta":
        raise AttnLangError(f"tensor {name!r} is on the meta device, which holds no values")
    if t.dim() != wanted[name]:
        raise AttnLangError(f"tensor {name!r} has {t.dim()} dimensions (shape {tuple(t.shape)}) but the "
                            f"expressions index it with {wanted[name]}")


def _param_const(name: str, value) -> Const:
    if isinstance(value, bool):
        return const(value)
    if isinstance(value, numbers.Integral):
        if not _INT64_MIN <= int(value) <= _INT64_MAX:
            raise AttnLangError(f"parameter {name!r} = {int(value)} does not fit in 64 bits; give a float")
        return const(int(value))
    if isinstance(value, numbers.Real):
        v = float(value)
        if not math.isfinite(v):  # configs must stay plain JSON; write `inf` in the expression instead
            raise AttnLangError(f"parameter {name!r} is {v}; parameters must be finite (write inf or -inf in the "
                                f"expression itself)")
        return const(v)
    kind = type(value).__name__
    hint = " (tensors are passed by name when calling the variant, not in params)" if kind == "Tensor" else ""
    raise AttnLangError(f"parameter {name!r} must be an int, float or bool, got {kind}{hint}")


def _validate_params(params) -> dict[str, Const]:
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise AttnLangError(f"params must be a dict of name -> scalar, got {type(params).__name__}")
    out = {}
    for name, value in params.items():
        if not isinstance(name, str) or not _IDENTIFIER.match(name):
            raise AttnLangError(f"parameter name {name!r} is not an identifier")
        if name in RESERVED_NAMES:
            raise AttnLangError(f"parameter {name!r} uses a reserved name; built-in names, function names and "
                                f"the call's keywords ({', '.join(CALL_KEYWORDS)}) cannot name a parameter")
        out[name] = _param_const(name, value)
    return out


def check(score: str = "score", mask: str = "True", params=None, sink: str | None = None) -> Checked:
    """Parse and check a variant's two expressions and its optional sink expression.

    Raises:
        AttnLangError: syntax errors, unknown functions or names, wrong arity, type errors, ``score`` in the mask,
            a mask that is not bool, a tensor used without an index, a parameter given but unused, a reserved
            name used as a parameter or tensor, a sink that reads ``score`` or ``kv_idx`` or is bool.
    """
    sources = {"score": score, "mask": mask}
    if sink is not None:
        sources["sink"] = sink
    trees = {w: parse(sources[w], where=w) for w in sources}
    _check_reserved_uses(params, trees, sources)
    consts = _validate_params(params)
    local = _check_local_names(trees, sources, consts)

    tensors: dict[str, int] = {}
    first_use: dict[str, tuple[str, object]] = {}
    for where, tree in trees.items():
        for node in walk(tree):
            if isinstance(node, Index):
                _check_tensor_name(node, where, sources, consts)
                n = len(node.indices)
                if tensors.setdefault(node.tensor, n) != n:
                    raise AttnLangError.at(f"tensor {node.tensor!r} is indexed with {n} indices here and "
                                           f"{tensors[node.tensor]} elsewhere", sources[where], node.span, where)
                first_use.setdefault(node.tensor, (where, node.span))
    for where, tree in trees.items():
        for node in walk(tree):
            if isinstance(node, Var) and node.name not in local[where]:
                other = [w for w in trees if node.name in local[w]]
                if other:
                    raise AttnLangError.at(f"{node.name!r} is bound in the {other[0]} expression, not in this one: "
                                           f"each expression has its own bindings (give a value both use in "
                                           f"params)", sources[where], node.span, where)
                _check_var(node, where, sources, consts, tensors)
            elif isinstance(node, Call):
                _check_call(node, where, sources)

    unused = sorted(set(consts) - {n.name for t in trees.values() for n in walk(t) if isinstance(n, Var)})
    if unused:
        raise AttnLangError(f"parameter {unused[0]!r} is given but neither expression uses it"
                            + (f" (also unused: {', '.join(map(repr, unused[1:]))})" if unused[1:] else ""))

    unused: dict[str, list] = {w: [] for w in trees}
    typed = {w: _infer(_substitute(t, consts), None, sources[w], w, unused[w]) for w, t in trees.items()}
    if any(local.values()):
        for where, tree in typed.items():
            _check_expanded_size(tree, sources[where], where)
    _check_roles(typed, sources, trees=trees)
    return Checked(typed["score"], typed["mask"], dict(tensors), sources, typed.get("sink"),
                   {w: tuple(values) for w, values in unused.items() if values})


def bind(checked: Checked, tensor_dtypes: Mapping[str, DType]) -> Checked:
    """Re-type a checked variant with the element types of the tensors given at call time."""
    typed = {w: _infer(checked.expr(w), tensor_dtypes, checked.sources[w], w) for w in checked.wheres}
    _check_roles(typed, checked.sources, final=True)
    unused = {w: tuple(_infer(x, tensor_dtypes, checked.sources[w], w) for x in values)
              for w, values in checked.unused.items()}
    return Checked(typed["score"], typed["mask"], checked.tensors, checked.sources, typed.get("sink"), unused)


def check_index_bounds(checked: Checked, env: Mapping[str, object], shapes: Mapping[str, tuple],
                       float32: bool = True, empty: frozenset = frozenset()) -> None:
    """Raise if any tensor index can fall outside its tensor.

    env: intervals of the built-in names (b, h, q_idx, kv_idx, q_len, kv_len) and of each tensor's values.
    shapes: tensor name -> shape.
    float32: floats may be computed in float32 (False: float64 throughout, as a float64 call computes them).
    empty: the names that take no value in this call (b, h, q_idx or kv_idx of a size-0 axis; q_len or kv_len of
        0); env's entries for them are not read. An expression whose positions include one of them is evaluated
        nowhere, so of its reads only the indices that mention none of them are checked (``bias[h, 5]`` with
        bias of size 3 is wrong for any length, ``doc[b, q_idx]`` of a [0, S] doc at batch 0 is fine); its
        divisors and int ranges are not checked (no value is computed). The sink has no ``kv_idx``: with
        kv_len 0 it is evaluated on every row.
    """
    for where, tree in checked.checked_trees():
        grid = _SINK_GRID if where == "sink" else _GRID
        skip = empty if empty & grid else frozenset()
        for node in walk(tree):
            if not isinstance(node, Index):
                continue
            shape = shapes[node.tensor]
            for axis, (index, size) in enumerate(zip(node.indices, shape)):
                if skip and names_used(index) & skip:
                    continue
                if size == 0:  # no index is valid, clamp or not
                    raise AttnLangError.at(
                        f"tensor {node.tensor!r} has size 0 along index {axis} (shape {tuple(shape)}): an empty "
                        f"tensor has no element to read", checked.sources[where], _use_span(index, node), where)
                r = _device_bounds(index, env, float32)
                if r.lo < 0 or r.hi > size - 1:
                    got = _fmt_interval(r)
                    raise AttnLangError.at(
                        f"index {axis} of {node.tensor!r} (size {size}) can take values in {got} for these "
                        f"lengths; it must stay in [0, {size - 1}] (wrap it in clamp(...) to bound it)",
                        checked.sources[where], _use_span(index, node), where)
        if skip:
            continue
        _check_divisors(tree, env, checked, where, float32)
        _check_int_range(tree, env, checked, where)


_GRID = frozenset({"b", "h", "q_idx", "kv_idx"})  # the positions the score and the mask are evaluated at
_SINK_GRID = frozenset({"b", "h", "q_idx"})  # the sink's: one per row


def check_float_range(checked: Checked, env: Mapping[str, object], fmax: float) -> None:
    """Raise if a float literal (or scalar param) or a float tensor's values are finite but past ``fmax``, the
    largest value of the compute dtype (float32's 3.4e38 for float32 / 16-bit inputs): there they would turn
    into inf, a silent mask or an overflowing lse (``score - 1e39``, ``score + c`` with c = 1e308)."""
    def beyond(x) -> bool:
        return math.isfinite(x) and abs(x) > fmax

    name = "float64" if fmax > 1e300 else "float32"
    for where, tree in checked.checked_trees():
        for node in walk(tree):
            if isinstance(node, Const) and node.dtype is DType.FLOAT and beyond(node.value):
                raise AttnLangError.at(f"{node.value!r} is outside {name}'s range (largest {fmax:.4g}), the dtype "
                                       f"this call computes scores in; it would become inf",
                                       checked.sources[where], node.span, where)
            if isinstance(node, Index) and node.dtype is DType.FLOAT:
                r = env.get(node.tensor)
                if isinstance(r, Interval) and (beyond(r.lo) or beyond(r.hi)):
                    raise AttnLangError.at(f"tensor {node.tensor!r} holds values in [{r.lo:.4g}, {r.hi:.4g}], outside "
                                           f"{name}'s range (largest {fmax:.4g}), the dtype this call computes "
                                           f"scores in; they would become inf", checked.sources[where],
                                           node.span, where)


# int64 wraps around; for these operations the wrapped result is still right whenever the final value fits, so
# only an int that leaves such a chain (into a comparison, //, float(), an index, ...) must fit in 64 bits.
_RING_OPS = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.POW, Op.NEG, Op.LSHIFT})  # x << s is x * 2**s


def _check_int_range(tree: Expr, env, checked: Checked, where: str) -> None:
    def ring(n) -> bool:
        return isinstance(n, (Binary, Unary)) and n.op in _RING_OPS and n.dtype is DType.INT

    def fail(message, node):
        raise AttnLangError.at(message, checked.sources[where], node.span, where)

    leaving = [tree] + [kid for node in walk(tree) if not ring(node) for kid in children(node)]
    for kid in leaving:
        if not ring(kid):
            continue
        r = bounds(kid, env)
        if _beyond_int64(r):
            fail(f"this integer can reach {_fmt_interval(r)}, outside 64 bits (int64 overflow); compute it in "
                 f"float (e.g. 2.0 ** 70)", kid)
    for node in walk(tree):
        if ring(node) or node.dtype is not DType.INT:
            continue
        if isinstance(node, Call) and node.func == "int" and node.args[0].dtype is DType.FLOAT:
            _check_int_of_float(node, env, fail)
            continue
        # abs(-2**63) and -2**63 // -1 are 2**63, which int64 wraps to -2**63 (other int ops stay in their range)
        if not (isinstance(node, Call) and node.func == "abs" or isinstance(node, Binary) and node.op is Op.FLOORDIV):
            continue
        r = bounds(node, env)
        if _beyond_int64(r):
            fail(f"this integer can reach {_fmt_interval(r)}, outside 64 bits (int64 overflow: it would wrap "
                 f"around)", node)


# The score's own range is known only inside the kernel: int() of an expression of the score is checked with the
# score taken in [-1, 1], so that an infinity or NaN found there comes from the rest of the expression.
_SCORE_FOR_INT = Interval(-1.0, 1.0)


def _check_int_of_float(node: Call, env, fail) -> None:
    """int() of a float must have an int64 value: not past int64 (int(1e30)), not inf, not NaN (int(inf),
    int(inf - inf), int(t[kv_idx]) of a tensor holding inf or NaN): torch gives garbage there."""
    arg = node.args[0]
    env = dict(env, score=_SCORE_FOR_INT)
    r = bounds(arg, env)
    if not (math.isfinite(r.lo) and math.isfinite(r.hi)):
        fail(f"int() of a value that can be {_fmt_interval(r)} here: inf and NaN are outside 64 bits (int64 "
             f"overflow: they have no int value); clamp it into a finite range first", node)
    for sub in walk(arg):  # clamp() gives finite bounds, but a NaN passes through it
        if sub.dtype is DType.FLOAT and bounds(sub, env) == TOP:  # NaN tensors, sqrt(-1.0), 0.0 * inf, ...
            fail("int() of a value that can be NaN here (a NaN passes through clamp, min and max): NaN is "
                 "outside 64 bits (int64 overflow: it has no int value)", node)
    if _beyond_int64(bounds(node, env)):
        fail(f"int() of a value that can reach {_fmt_interval(r)}, outside 64 bits (int64 overflow); keep it a "
             f"float, or clamp it first", node)


def _beyond_int64(r: Interval) -> bool:
    """A finite bound outside int64 (an infinite one only says the analysis does not know)."""
    return (r.hi != math.inf and r.hi > _INT64_MAX) or (r.lo != -math.inf and r.lo < _INT64_MIN)


# An int / floor / ceil of a float turns the float's rounding into a step of 1. The backends compute floats in
# float32, where a value that float64 puts just below an integer can round onto it (erf(4.0) * 4 is 3.99999994 in
# float64, 4.0 in float32): for the checks that keep a read inside its tensor or a divisor off 0, a non-integer end
# of the float argument's range is widened by this relative margin (8 float32 ulps), onto the next integer at most,
# before it is converted; an integer end is widened past the integer where float arithmetic computes it (float32 can
# land just below or above it), and every end past 2**24 (float32 rounds across integers there).
_F32_MARGIN = 2.0 ** -20


def _device_bounds(expr: Expr, env, float32: bool = True) -> Interval:
    """``bounds(expr, env)``, covering float32's rounding where a float becomes an int (int, floor, ceil)."""
    if not any(isinstance(n, Call) and n.func in ("int", "floor", "ceil") and n.args[0].dtype is DType.FLOAT
               for n in walk(expr)):
        return bounds(expr, env)
    env = dict(env)
    memo: dict[int, Expr] = {}

    def widen(x: float, down: bool, exact: bool) -> float:
        if not math.isfinite(x):
            return x
        if float32 and abs(x) >= 2.0 ** 24:  # float32 holds no longer every integer: rounding moves any value
            return x - abs(x) * _F32_MARGIN if down else x + abs(x) * _F32_MARGIN
        if float(x).is_integer():
            if exact or not float32:
                return x
            # float32 arithmetic can land just off an integer that float64 gives exactly, on either side (5.0 *
            # 0.01 * 100.0 is 5.0 in float64, 4.9999995 in float32)
            return x - abs(x) * _F32_MARGIN if down else x + abs(x) * _F32_MARGIN
        # onto the nearest integer at most (rounding lands on it, not past it)
        return max(x - abs(x) * _F32_MARGIN, math.floor(x)) if down else min(x + abs(x) * _F32_MARGIN, math.ceil(x))

    def sub(node: Expr) -> Expr:
        got = memo.get(id(node))
        if got is not None:
            return got
        kids = children(node)
        out = with_children(node, tuple(sub(k) for k in kids)) if kids else node
        if isinstance(out, Call) and out.func in ("int", "floor", "ceil") and out.args[0].dtype is DType.FLOAT:
            r = bounds(out.args[0], env)
            name = f"\0float32 {len(memo)}"  # no identifier: never a name of the expression
            exact = _f32_exact(out.args[0])
            wide = Interval(widen(r.lo, True, exact), widen(r.hi, False, exact))
            env[name] = bounds(with_children(out, (Var(name, None, DType.FLOAT),)), {**env, name: wide})
            out = Var(name, out.span, out.dtype)
        memo[id(node)] = out
        return out

    return bounds(sub(expr), env)


def _f32_exact(node: Expr) -> bool:
    """float32 gives this float's value as float64 does, give or take rounding onto a neighbouring integer: a
    literal, a name, a read, float() of an int, and -, abs, min, max, clamp, where, floor, ceil of such; and any
    constant subexpression (no name, no read), which the simplifier folds in float64 before any kernel runs."""
    if isinstance(node, (Const, Var, Index)):
        return True
    if not any(isinstance(n, (Var, Index)) for n in walk(node)):
        return True
    if isinstance(node, Unary):
        return _f32_exact(node.operand)
    if isinstance(node, Call) and node.func in ("float", "abs", "min", "max", "clamp", "where", "floor", "ceil",
                                                "int", "sign"):
        return all(_f32_exact(a) for a in node.args if a.dtype is DType.FLOAT)
    return False


def _check_divisors(tree: Expr, env, checked: Checked, where: str, float32: bool = True) -> None:
    for node in walk(tree):
        if isinstance(node, Binary) and node.op in (Op.FLOORDIV, Op.MOD) and node.dtype is DType.INT:
            r = _device_bounds(node.right, env, float32)
            if r.contains(0):
                raise AttnLangError.at(f"integer {'division' if node.op is Op.FLOORDIV else 'modulo'} by a "
                                       f"value that can be 0 (it ranges over {_fmt_interval(r)})",
                                       checked.sources[where], _use_span(node.right, node), where)
        if isinstance(node, Binary) and node.op in (Op.LSHIFT, Op.RSHIFT):
            r = bounds(node.right, env)
            if r.lo < 0 or r.hi > 63:  # torch gives 0 or garbage there, Python an error or a bigger int
                raise AttnLangError.at(f"a shift by an amount that can take values in {_fmt_interval(r)}; shifts of "
                                       f"64-bit ints must lie in [0, 63] (clamp the amount)", checked.sources[where],
                                       _use_span(node.right, node), where)
        if isinstance(node, Binary) and node.op is Op.POW and node.dtype is DType.INT:
            r = bounds(node.right, env)
            if r.lo < 0:  # Python gives a float there; an int result cannot hold it
                raise AttnLangError.at(f"an int raised to an int power that can be negative (the exponent ranges "
                                       f"over {_fmt_interval(r)}); use a float base, e.g. 2.0 ** ...",
                                       checked.sources[where], _use_span(node.right, node), where)


def _use_span(operand: Expr, node: Expr):
    """Where an error about ``operand`` of ``node`` points: the operand as written, or ``node`` when the operand is
    the value of a bound name or a generator's variable, written elsewhere (``x = q_idx + 5`` on line 1,
    ``t[x]`` on line 2: the caret goes under ``t[x]``, not under ``q_idx + 5``, a line that reads no ``t``)."""
    o, n = operand.span, node.span
    if o is None or (n is not None and not (n.start <= o.start and o.end <= n.end)):
        return n
    return o


def _fmt_interval(r: Interval) -> str:
    def f(x):
        if isinstance(x, int):  # intervals.bounds caps ints at +-2**128 (past int64 their size does not matter)
            return str(x) if abs(x) < 1 << 128 else f"{'-' if x < 0 else ''}2**128 or beyond"
        return str(int(x)) if math.isfinite(x) and float(x).is_integer() else str(x)
    return f"[{f(r.lo)}, {f(r.hi)}]"


def _check_reserved_uses(params, trees, sources) -> None:
    """A parameter with a reserved name that an expression uses: the error points at the use."""
    if not isinstance(params, Mapping):
        return
    for where, tree in trees.items():
        for node in walk(tree):
            name = node.name if isinstance(node, Var) else node.tensor if isinstance(node, Index) else None
            if name in params and name in RESERVED_NAMES:
                raise AttnLangError.at(f"parameter {name!r} uses a reserved name; built-in names, function names "
                                       f"and the call's keywords ({', '.join(CALL_KEYWORDS)}) cannot name a "
                                       f"parameter", sources[where], node.span, where)


def _check_tensor_name(node: Index, where, sources, consts) -> None:
    name = node.tensor
    if name in BUILTIN_VARS:
        raise AttnLangError.at(f"{name!r} is a built-in {BUILTIN_VARS[name].value}, not a tensor; it cannot be "
                               f"indexed", sources[where], node.span, where)
    if name in consts:
        raise AttnLangError.at(f"{name!r} is a scalar parameter; it cannot be indexed", sources[where], node.span,
                               where)
    if name in RESERVED_NAMES:
        raise AttnLangError.at(f"{name!r} is a reserved name and cannot name a tensor", sources[where], node.span,
                               where)


def _check_var(node: Var, where, sources, consts, tensors) -> None:
    name = node.name
    if name == "score" and where == "mask":
        raise AttnLangError.at("'score' cannot be used in a mask: the mask decides which pairs attend, before "
                               "scores exist", sources[where], node.span, where)
    if name in ("score", "kv_idx") and where == "sink":
        raise AttnLangError.at(f"{name!r} cannot be used in a sink expression: the sink is one extra key per row "
                               f"(it may read b, h, q_idx, q_len, kv_len, params and tensors)", sources[where],
                               node.span, where)
    if name in BUILTIN_VARS or name in consts:
        return
    if name in tensors:
        raise AttnLangError.at(f"tensor {name!r} used without an index; read it as {name}[...]", sources[where],
                               node.span, where)
    if name in FUNCTIONS:
        raise AttnLangError.at(f"function {name!r} used without arguments; call it as {name}(...)",
                               sources[where], node.span, where)
    if name in REDUCTIONS or name == "range":
        call = "range(K)" if name == "range" else f"{name}(expr for i in range(K))"
        raise AttnLangError.at(f"function {name!r} used without arguments; call it as {call}", sources[where],
                               node.span, where)
    if name in RESERVED_NAMES:
        raise AttnLangError.at(f"{name!r} is a keyword of the call and cannot name a scalar", sources[where],
                               node.span, where)
    raise AttnLangError.at(f"scalar parameter {name!r} was not given; pass it in params={{{name!r}: ...}} "
                           f"(or index it, if it is a tensor)", sources[where], node.span, where)


def _check_call(node: Call, where, sources) -> None:
    if node.func in REDUCTIONS and node.func not in FUNCTIONS:
        raise AttnLangError.at(f"{node.func}() takes a generator over a fixed range: {node.func}(expr for i in "
                               f"range(K))", sources[where], node.span, where)
    if node.func not in FUNCTIONS:
        known = ", ".join(sorted(FUNCTIONS))
        raise AttnLangError.at(f"unknown function {node.func!r}; known functions: {known}", sources[where],
                               _name_span(node), where)
    want = FUNCTIONS[node.func]
    if len(node.args) != want:
        raise AttnLangError.at(f"{node.func}() takes {want} argument{'s' if want != 1 else ''}, got "
                               f"{len(node.args)}", sources[where], node.span, where)


def _name_span(node):
    from .ast import Span
    s = node.span
    if s is None:
        return None
    return Span(s.line, s.column, s.start, s.start + len(node.func))


def _substitute(tree: Expr, consts: Mapping[str, Const]) -> Expr:
    if not consts:
        return tree

    def sub(node):
        if isinstance(node, Var) and node.name in consts:
            c = consts[node.name]
            return Const(c.value, c.dtype, node.span)
        kids = children(node)
        return with_children(node, tuple(sub(k) for k in kids)) if kids else node
    return sub(tree)


def _result_name(tree) -> tuple | None:
    """(name, span of its use) where an expression's result is a bare bound name (``x = q_idx * 2.0; x``)."""
    if isinstance(tree, Let) and isinstance(tree.body, Var) and any(b.name == tree.body.name for b in tree.bindings):
        return tree.body.name, tree.body.span
    return None


def _check_roles(typed, sources, final: bool = False, trees=None) -> None:
    """The roles' types: score and sink numbers, mask bool. ``trees`` (compile time): the unexpanded expressions,
    so that a result that is a bare bound name gets the caret under that name, not under its binding."""
    if trees is not None:
        typed = dict(typed)
        for w, tree in trees.items():
            got = _result_name(tree)
            if got is not None and typed.get(w) is not None:
                name, span = got
                typed[w] = _Use(typed[w].dtype, span, name, typed[w].span)
    s, m = typed["score"], typed["mask"]
    if s.dtype is DType.BOOL:
        raise AttnLangError.at("the score expression must be a number (float), but it is bool; a condition "
                               "belongs in the mask, or use where(cond, score, -inf)" + _bound_note(s),
                               sources["score"], s.span, "score")
    k = typed.get("sink")
    if k is not None and k.dtype is DType.BOOL:
        raise AttnLangError.at("the sink expression must be a number (float: the logit of the extra key), but it "
                               "is bool" + _bound_note(k), sources["sink"], k.span, "sink")
    if m.dtype in (DType.INT, DType.FLOAT):
        raise AttnLangError.at(f"the mask must be bool, but it is {m.dtype.value}; compare it, e.g. "
                               f"'... != 0'" + _bound_note(m), sources["mask"], m.span, "mask")


@dataclass(frozen=True)
class _Use:
    """A result that is a bare bound name, for _check_roles' messages: its type, the span of the name's use, the
    name and the span of its value in the binding."""
    dtype: DType
    span: object
    name: str
    bound: object


def _bound_note(node) -> str:
    return _bound_to(node.name, node.dtype, node.bound) if isinstance(node, _Use) else ""


def _bound_to(name: str, dtype: DType, bound) -> str:
    """The note of a type error on a bound name's value: what the name is bound to, and where (``bound``, the
    value's span)."""
    at = f" at line {bound.line}, column {bound.column}" if bound is not None else ""
    return f" ({name!r} is bound to {_a(dtype)}{at})"


def _a(dtype: DType) -> str:
    return ("an " if dtype is DType.INT else "a ") + dtype.value


def _join(a: DType, b: DType) -> DType:
    if DType.UNKNOWN in (a, b):
        return DType.UNKNOWN
    return DType.FLOAT if DType.FLOAT in (a, b) else DType.INT


def _infer(tree: Expr, tensor_dtypes, source: str, where: str, unused: list | None = None) -> Expr:
    """Type every node bottom-up. ``tensor_dtypes`` None means compile time (tensor reads UNKNOWN). ``unused``
    (a list) receives the typed values of the bindings that no later binding and not the result use.

    Bindings and reductions (compile time only) are expanded here: a bound name becomes its typed value (one shared
    node), a reduction the balanced tree of its terms with the generator's variable as each constant in turn."""
    scope: dict[str, Expr] = {}
    looked_up: set[str] = set()  # bound names used (by a later binding or the result)
    budget = [8 * MAX_NODES]  # nodes visited; a runaway expansion stops long before it costs time
    # A reduction's first term stands for all its terms (every later one costs at least as much: it differs only in
    # the constant i, and a range(i) inside grows with i), so its visits are charged `mult` times, the later terms
    # only for what they cost beyond the first: the budget counts the same visits as a plain count, but runs out
    # at the first term of the innermost reduction of a runaway nest (sum(sum(... for i in range(2)) ...) 50
    # deep), not after the budget's worth of work.
    mult = [1]
    seen = [0]  # visits made
    # a bound name's value is one shared node with the binding's span; where a check fails on it as an operand,
    # the caret goes under the name where it is used (its last use: operands are visited right before their
    # parent's checks), and the message says what the name was bound to. id -> (value, use span, name)
    uses: dict[int, tuple] = {}

    def fail(msg, node):
        use = uses.get(id(node))
        if use is not None and use[0] is node:
            value, span, name = use
            raise AttnLangError.at(msg + _bound_to(name, value.dtype, value.span), source, span, where)
        raise AttnLangError.at(msg, source, node.span, where)

    def want_numeric(node, what):
        if node.dtype is DType.BOOL:
            fail(f"{what} expects a number, but this is bool (use float(...) or int(...) to convert)", node)

    def want_bool(node, what):
        if node.dtype in (DType.INT, DType.FLOAT):
            fail(f"{what} expects a bool, but this is {node.dtype.value}", node)

    def want_int(node, what):
        if node.dtype in (DType.BOOL, DType.FLOAT):
            fail(f"{what} expects an int, but this is {node.dtype.value}", node)

    def visit(node):
        seen[0] += 1
        budget[0] -= mult[0]
        if budget[0] < 0:
            fail(f"expression too large once its bindings and reductions are expanded (more than {MAX_NODES} "
                 f"nodes)", node)
        if isinstance(node, Const):
            if node.dtype is DType.INT and not _INT64_MIN <= node.value <= _INT64_MAX:
                fail(f"integer {node.value} does not fit in 64 bits; write it as a float", node)
            return node
        if isinstance(node, Let):
            return visit_let(node)
        if isinstance(node, Reduce):
            return visit_reduce(node)
        if isinstance(node, Var) and node.name in scope:
            looked_up.add(node.name)
            return scope[node.name]
        kids = tuple(visit(k) for k in children(node))
        for child, kid in zip(children(node), kids):  # this node's own operands that are bound names
            if isinstance(child, Var) and child.name in scope:
                uses[id(kid)] = (kid, child.span, child.name)
        if isinstance(node, Var):
            if node.name not in BUILTIN_VARS:
                fail(f"{node.name!r} is not bound here: a binding is visible after it, a generator's variable only "
                     f"inside its generator", node)
            return with_children(node, (), BUILTIN_VARS[node.name])
        if isinstance(node, Index):
            for k in kids:
                if k.dtype in (DType.BOOL, DType.FLOAT):
                    fail(f"an index of {node.tensor!r} must be an int, but this is {k.dtype.value} "
                         f"(use int(...) to truncate)", k)
            dt = DType.UNKNOWN if tensor_dtypes is None else tensor_dtypes[node.tensor]
            return with_children(node, kids, dt)
        if isinstance(node, Unary):
            (x,) = kids
            if node.op is Op.NEG:
                want_numeric(x, "unary '-'")
                return with_children(node, kids, x.dtype)
            if x.dtype is DType.INT:
                fail("'~' of an int: '~' and 'not' are logical not, on bools only (for the bits, use x ^ -1)", node)
            want_bool(x, "'~' (not)")
            return with_children(node, kids, DType.BOOL)
        if isinstance(node, Binary):
            x, y = kids
            op = node.op
            if op in LOGICAL or op in (Op.BITAND, Op.BITOR):
                return logic_or_bits(node, x, y)
            if op in (Op.XOR, Op.LSHIFT, Op.RSHIFT):
                want_int(x, f"'{op.value}'")
                want_int(y, f"'{op.value}'")
                if op is not Op.XOR and isinstance(y, Const) and not 0 <= y.value <= 63:
                    fail(f"a shift by {y.value}; shifts of 64-bit ints must lie in [0, 63]", y)
                return with_children(node, kids, DType.INT)
            if op in COMPARISONS:
                if op in (Op.EQ, Op.NE):
                    bx, by = x.dtype is DType.BOOL, y.dtype is DType.BOOL
                    kx, ky = x.dtype is not DType.UNKNOWN, y.dtype is not DType.UNKNOWN
                    if kx and ky and bx != by:
                        fail(f"'{op.value}' compares a bool with a number; convert one side", node)
                else:
                    want_numeric(x, f"'{op.value}'")
                    want_numeric(y, f"'{op.value}'")
                return with_children(node, kids, DType.BOOL)
            assert op in ARITHMETIC
            what = "sum()" if node.of_sum else f"'{op.value}'"  # a term of sum() that a bound tensor made bool
            want_numeric(x, what)
            want_numeric(y, what)
            if op is Op.TRUEDIV:
                return with_children(node, kids, DType.FLOAT)
            if op is Op.POW and x.dtype is DType.INT and isinstance(y, Const) and y.dtype is DType.INT \
                    and y.value < 0:
                fail("an int raised to a negative int power; write a float, e.g. 2.0 ** -1", y)
            return with_children(node, kids, _join(x.dtype, y.dtype))
        assert isinstance(node, Call)
        f = node.func
        if f == "where":
            c, a, b = kids
            # where(term, True, False) without spans is a term of any() / all() read from a tensor (visit_reduce)
            made = all(isinstance(x, Const) and x.span is None for x in node.args[1:])
            want_bool(c, "each term of any() / all()" if made else "where()'s condition")
            if DType.UNKNOWN in (a.dtype, b.dtype):
                dt = DType.UNKNOWN  # an unknown branch decides the type at call time
            elif (a.dtype is DType.BOOL) != (b.dtype is DType.BOOL):
                fail("where() branches must both be numbers or both be bool", node)
            else:
                dt = DType.BOOL if a.dtype is DType.BOOL else _join(a.dtype, b.dtype)
            return with_children(node, kids, dt)
        if f == "float":
            return with_children(node, kids, DType.FLOAT)
        if f == "int":
            return with_children(node, kids, DType.INT)
        for k in kids:
            want_numeric(k, f"{f}()")
        if f in _FLOAT_FUNCS:
            return with_children(node, kids, DType.FLOAT)
        if f in _SAME_TYPE_FUNCS:
            return with_children(node, kids, kids[0].dtype)
        dt = kids[0].dtype
        for k in kids[1:]:
            dt = _join(dt, k.dtype)
        return with_children(node, kids, dt)

    def logic_or_bits(node, x, y):
        """``&`` / ``|``: logical on bools, bitwise on ints; the operand types decide."""
        logical = Op.AND if node.op in (Op.AND, Op.BITAND) else Op.OR
        name = "'&'" if logical is Op.AND else "'|'"
        for k in (x, y):
            if k.dtype is DType.FLOAT:
                fail(f"{name} expects bools (logic) or ints (bits), but this is float", k)
        kinds = {x.dtype, y.dtype}
        if node.word:
            word = "and" if logical is Op.AND else "or"
            for k, written in ((x, node.left), (y, node.right)):
                if k.dtype is DType.INT:  # the caret under the operand as written (a bound name, not its value)
                    fail(f"'{word}' is logic on bools only, but this is an int; for the bits write "
                         f"'{name[1]}' (e.g. (x {name[1]} 3) == 1), for logic compare it (e.g. x != 0)",
                         written if written.span is not None else k)
        if DType.INT in kinds:
            if DType.BOOL in kinds:
                fail(f"{name} mixes an int and a bool: this is an int; compare it (e.g. (x & 1) == 1) for logic, or "
                     f"convert the bool with int() for bits", x if x.dtype is DType.INT else y)
            return Binary(Op.BITAND if logical is Op.AND else Op.BITOR, x, y, node.span, DType.INT)
        # bools, or tensor reads whose type is known at call time only (binding decides again then): two tensor
        # reads may be ints, so `(t[q_idx] & u[kv_idx]) == 0` stays open (UNKNOWN) until their types are known
        dt = DType.UNKNOWN if kinds == {DType.UNKNOWN} and not node.word else DType.BOOL
        return Binary(logical, x, y, node.span, dt, word=node.word)

    def visit_let(node: Let):
        saved = dict(scope)
        for b in node.bindings:
            scope[b.name] = visit(b.value)
        out = visit(node.body)
        if unused is not None:
            unused.extend(scope[b.name] for b in node.bindings if b.name not in looked_up)
        scope.clear()
        scope.update(saved)
        return out

    def visit_reduce(node: Reduce):
        f = node.func
        if f not in REDUCTIONS:
            fail(f"{f}() does not take a generator; the reductions are {', '.join(REDUCTIONS)}", node)
        count = visit(node.count)
        if not (isinstance(count, Const) and count.dtype is DType.INT):
            fail("range() takes an int literal or an int parameter (the number of terms is fixed at compile time)",
                 node.count)
        k = count.value
        if k < 0:
            fail(f"range({k}) of a negative count", node.count)
        if k > MAX_TERMS:
            fail(f"range({k}) has more than {MAX_TERMS} terms", node.count)
        if k == 0 and f in ("max", "min"):
            fail(f"{f}() of an empty range", node.count)
        saved = scope.get(node.var)
        terms = []
        outer, first = mult[0], 0
        for i in range(k):
            scope[node.var] = Const(i, DType.INT, node.var_span)
            start = seen[0]
            mult[0] = outer * k if i == 0 else 0
            term = visit(node.body)
            mult[0] = outer
            cost = seen[0] - start
            if i == 0:
                first = cost
            elif cost > first:
                budget[0] -= (cost - first) * outer
                if budget[0] < 0:
                    fail(f"expression too large once its bindings and reductions are expanded (more than "
                         f"{MAX_NODES} nodes)", node)
            if f in ("any", "all"):
                if term.dtype in (DType.INT, DType.FLOAT):
                    fail(f"{f}() needs a bool for each term, but this is {term.dtype.value}", term)
                if term.dtype is DType.UNKNOWN:  # a tensor read: binding checks that it is bool
                    term = Call("where", (term, Const(True, DType.BOOL), Const(False, DType.BOOL)), term.span,
                                DType.BOOL)
            else:
                want_numeric(term, f"{f}()")
            terms.append(term)
        if saved is None:
            scope.pop(node.var, None)
        else:
            scope[node.var] = saved
        if not terms:
            return Const({"sum": 0, "any": False, "all": True}[f],
                         DType.INT if f == "sum" else DType.BOOL, node.span)
        return _balanced(terms, lambda a, b: _combine(f, a, b, node.span))

    return visit(tree)


def _combine(func: str, a: Expr, b: Expr, span) -> Expr:
    if func == "sum":
        return Binary(Op.ADD, a, b, span, _join(a.dtype, b.dtype), of_sum=True)
    if func in ("any", "all"):
        return Binary(Op.OR if func == "any" else Op.AND, a, b, span, DType.BOOL)
    return Call(func, (a, b), span, _join(a.dtype, b.dtype))


def _balanced(terms: list, make) -> Expr:
    """One tree of the terms, depth log2(len): reductions stay shallow for every later (recursive) stage."""
    while len(terms) > 1:
        terms = [make(terms[i], terms[i + 1]) if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def _check_expanded_size(tree: Expr, source: str, where: str) -> None:
    """The expanded expression (bindings substituted, reductions unrolled) must stay within MAX_NODES nodes and
    MAX_DEPTH levels; both are computed on the shared nodes, so the check itself never expands anything."""
    size: dict[int, tuple[int, int]] = {}
    stack = [(tree, False)]
    while stack:
        node, ready = stack.pop()
        if id(node) in size:
            continue
        kids = children(node)
        if ready or not kids:
            got = [size[id(k)] for k in kids]
            size[id(node)] = (1 + sum(n for n, _ in got), 1 + max((d for _, d in got), default=0))
        else:
            stack.append((node, True))
            stack.extend((k, False) for k in kids)
    n, d = size[id(tree)]
    if n > MAX_NODES:
        raise AttnLangError(f"expression has {n} nodes once its bindings and reductions are expanded; at most "
                            f"{MAX_NODES}", source, 1, 1, len(source), where=where)
    if d > MAX_DEPTH:
        raise AttnLangError(f"expression nested too deeply once its bindings and reductions are expanded ({d} "
                            f"levels; at most {MAX_DEPTH})", source, 1, 1, len(source), where=where)


def _check_local_names(trees, sources, consts) -> dict[str, set[str]]:
    """Names bound by ``name = ...`` or by a generator's ``for name in``: each must be new (not built in, a
    parameter, a tensor, a function or a keyword, and not bound already where it is bound). Returns them per
    expression (a binding is local to its expression)."""
    tensors = {n.tensor for t in trees.values() for n in walk(t) if isinstance(n, Index)}
    local: dict[str, set[str]] = {where: set() for where in trees}

    def new_name(name, span, scope, where):
        def fail(msg):
            raise AttnLangError.at(msg, sources[where], span, where)
        if name in BUILTIN_VARS:
            fail(f"{name!r} is a built-in name ({BUILTIN_VARS[name].value}) and cannot be bound")
        if name in consts:
            fail(f"{name!r} is a parameter given in params; it cannot also be bound here")
        if name in tensors:
            fail(f"{name!r} is a tensor the expressions read; it cannot also be bound")
        if name in FUNCTIONS or name in REDUCTIONS or name == "range":
            fail(f"{name!r} is a function name and cannot be bound")
        if name in RESERVED_NAMES:
            fail(f"{name!r} is a reserved name (a keyword of the call or of the language) and cannot be bound")
        if name in scope:
            first = scope[name]
            at = f" (line {first.line}, column {first.column})" if first is not None else ""
            fail(f"{name!r} is bound already{at}; pick another name")

    for where, tree in trees.items():
        stack = [(tree, {})]
        while stack:
            node, scope = stack.pop()
            if isinstance(node, Let):
                inner = dict(scope)
                for b in node.bindings:
                    stack.append((b.value, dict(inner)))
                    new_name(b.name, b.span, inner, where)
                    inner[b.name] = b.span
                    local[where].add(b.name)
                stack.append((node.body, inner))
            elif isinstance(node, Reduce):
                new_name(node.var, node.var_span, scope, where)
                local[where].add(node.var)
                stack.append((node.count, scope))
                stack.append((node.body, {**scope, node.var: node.var_span}))
            else:
                stack.extend((k, scope) for k in children(node))
    return local
