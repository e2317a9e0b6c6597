"""Property testing of attention variants across backends.

For users checking their own variants, and for attnlang's own tests::

    from hypothesis import given, settings
    from attnlang.testing import assert_backends_agree, shapes, variants, tensors_for, make_qkv

    @settings(max_examples=20, deadline=None)
    @given(variant=variants(), shape=shapes())
    def test_flex_matches_eager(variant, shape):
        q, k, v = make_qkv(shape, dtype=torch.float32)
        tensors = tensors_for(variant, shape.batch, shape.q_heads, shape.q_len, shape.kv_len)
        assert_backends_agree(variant, q, k, v, **tensors)   # flex vs eager; gradients where flex has them

Your own variant, with your own tensor values by name (a strategy name of ``TENSOR_STRATEGIES`` or a callable
``(shape, generator) -> tensor``), fresh per example with ``named_tensors``::

    alibi_doc = al.compile("score + slope[h] * (kv_idx - q_idx)", "doc[q_idx] == doc[kv_idx]")

    @given(shape=shapes(), data=st.data())
    def test_mine(shape, data):
        tensors = data.draw(named_tensors(alibi_doc, shape, strategies={"slope": "positive", "doc": "sorted_ids"}))
        assert_backends_agree(alibi_doc, *make_qkv(shape), **tensors)

Generated variants only use total, smooth-enough operations on valid inputs: integer ``//`` and ``%`` divide by
non-zero constants, tensor indices are plain positions or ``clamp(...)``-ed, functions that could produce NaN or
+inf get arguments that keep them finite, and discontinuous operations (``floor``, ``int``, comparisons, ...) never
see the score (a last-ulp difference in q·k between kernels would otherwise flip them).

Tolerances (``TOLERANCES``): |got - ref| <= atol + rtol * |ref| elementwise, with atol scaled by the largest |ref|
of that tensor when it exceeds 1 (so gradients of any magnitude compare fairly):

    dtype     out / lse (atol, rtol)   gradients (atol, rtol)
    float64   1e-9, 1e-9               1e-8, 1e-8
    float32   2e-4, 2e-4               2e-3, 2e-3
    float16   5e-3, 5e-3               2e-2, 2e-2
    bfloat16  3e-2, 2e-2               8e-2, 5e-2

lse is float32 on every backend, so its tolerance is never tighter than float32's. fp16/bf16 tolerances cover
one rounding of the output to the input dtype plus float32 accumulation-order differences between fused kernels
and the float32 eager reference.
"""

from __future__ import annotations

import importlib
import itertools
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .ast import Binary, DType, Index, Op, walk
from .check import bind
from .errors import AttnLangError
from .intervals import Interval, bounds
from .sparsity import positive_int
from .variant import Variant
from .variant import compile as compile_variant

__all__ = ["Shape", "variants", "shapes", "tensors_for", "named_tensors", "make_qkv", "assert_backends_agree",
           "TOLERANCES", "ODD_LENGTHS", "TENSOR_POOL", "TENSOR_STRATEGIES", "LANGUAGE_EXAMPLES", "language_examples"]

ODD_LENGTHS = (1, 7, 45, 97, 130)
MAX_DEPTH = 32  # deeper generated expressions would pass Python's recursion limit while Hypothesis draws them


def _need_variant(fn: str, variant) -> None:
    if not isinstance(variant, Variant):
        raise AttnLangError(f"{fn} takes an attnlang Variant first, got {type(variant).__name__}")


def _need_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not -2 ** 63 <= seed < 2 ** 64:
        raise AttnLangError(f"seed must be an int in [-2**63, 2**64), got {seed!r}")
    return seed


def _need_int_range(int_range) -> tuple[int, int]:
    """``int_range`` as (lo, hi): ints with lo < hi (hi excluded), both in int64 (torch.randint's bounds)."""
    ok = isinstance(int_range, (tuple, list)) and len(int_range) == 2 and all(
        isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in int_range)
    if not ok or not -2 ** 63 <= int_range[0] < int_range[1] <= 2 ** 63 - 1:
        raise AttnLangError(f"int_range must be a pair of ints (lo, hi) with lo < hi (hi excluded), both in int64, "
                            f"got {int_range!r}")
    return int(int_range[0]), int(int_range[1])


def _need_device(device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise AttnLangError(f"device {device!r} is not a torch device: {e}") from None


def _need_flag(name: str, value, allow_none: bool = False) -> None:
    if not (isinstance(value, bool) or (allow_none and value is None)):
        raise AttnLangError(f"{name} must be True{', False or None' if allow_none else ' or False'}, got {value!r}")


def _need_ints(name: str, values, lo: int = 1) -> tuple:
    values = tuple(values) if isinstance(values, (tuple, list, range)) else values
    if not isinstance(values, tuple) or not values or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= lo for x in values):
        raise AttnLangError(f"{name} must be a non-empty sequence of ints >= {lo}, got {values!r}")
    return values

# (out and lse, gradients): (atol, rtol)
TOLERANCES = {
    torch.float64: ((1e-9, 1e-9), (1e-8, 1e-8)),
    torch.float32: ((2e-4, 2e-4), (2e-3, 2e-3)),
    torch.float16: ((5e-3, 5e-3), (2e-2, 2e-2)),
    torch.bfloat16: ((3e-2, 2e-2), (8e-2, 5e-2)),
}

# The tensors generated variants read: name -> (element dtype, ndim). The prefix names the dtype so that
# tensors_for can build them without guessing (f_: float, i_: int, m_: bool).
TENSOR_POOL = {
    "f_vec": (torch.float32, 1),
    "f_mat": (torch.float32, 2),
    "i_vec": (torch.int64, 1),
    "m_vec": (torch.bool, 1),
}
_PREFIX_DTYPES = {"f_": torch.float32, "i_": torch.int64, "m_": torch.bool}
_INDEX_NAMES = ("b", "h", "q_idx", "kv_idx")
_INT_LEAVES = ("b", "h", "q_idx", "kv_idx", "q_len", "kv_len")
_INT_DIVISORS = (-3, -2, 2, 3, 5, 7)


@dataclass(frozen=True)
class Shape:
    """Sizes of one attention call: q [batch, q_heads, q_len, head_dim], k/v [batch, kv_heads, kv_len, head_dim]."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int


def _st():
    try:
        from hypothesis import strategies as st
    except ImportError as e:  # pragma: no cover - hypothesis is a test dependency
        raise ImportError("attnlang.testing's strategies need hypothesis (pip install hypothesis)") from e
    return st


# ---------------------------------------------------------------------------------------------------------------
# the examples of LANGUAGE.md

# name -> al.compile's positional arguments: (score, mask, params), then (sink, normalize) where the example has them
LANGUAGE_EXAMPLES = {
    "causal": ("score", "q_idx >= kv_idx", {}),
    "sliding_window": ("score", "0 <= q_idx - kv_idx < window", {"window": 33}),
    "alibi": ("score + slope[h] * (kv_idx - q_idx)", "q_idx >= kv_idx", {}),
    "softcap": ("cap * tanh(score / cap)", "q_idx >= kv_idx", {"cap": 2.0}),
    "document": ("score", "doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx", {}),
    "prefix_lm": ("score", "kv_idx < prefix | q_idx >= kv_idx", {"prefix": 20}),
    "decode_causal": ("score", "kv_idx <= q_idx + kv_len - q_len", {}),
    "learned_sinks_window": ("score", "q_idx >= kv_idx & q_idx - kv_idx < 128", {}, "sinks[h]"),
    "sigmoid": ("log(sigmoid(score - bias))", "True", {"bias": 2.0}, None, False),
}


def _example_tensors(name: str, batch: int, q_heads: int, q_len: int, kv_len: int, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    if name == "alibi":
        return {"slope": (torch.rand(q_heads, generator=g) * 0.5).to(device)}
    if name == "document":
        # sorted document ids over the longer sequence, several documents, so some rows see few keys
        n = max(q_len, kv_len)
        return {"doc": torch.randint(0, 4, (n,), generator=g).sort().values.to(device)}
    if name == "learned_sinks_window":
        return {"sinks": torch.randn(q_heads, generator=g).to(device)}
    return {}


def language_examples(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu", seed: int = 0):
    """[(name, Variant, tensors)] for every example of LANGUAGE.md, with tensors for these sizes."""
    return [(name, compile_variant(*spec), _example_tensors(name, batch, q_heads, q_len, kv_len, device, seed))
            for name, spec in LANGUAGE_EXAMPLES.items()]


# ---------------------------------------------------------------------------------------------------------------
# shapes

def shapes(lengths=ODD_LENGTHS, head_dims=(16, 32), max_batch: int = 2, max_kv_heads: int = 2,
           max_group: int = 3, decode: bool = True):
    """Strategy of ``Shape``: lengths from ``lengths`` (odd, not multiples of the 128 block), grouped-query heads
    (q_heads = kv_heads * group), and with ``decode`` some shapes with q_len < kv_len (q_len 1 or a short tail)."""
    lengths, head_dims = _need_ints("lengths", lengths), _need_ints("head_dims", head_dims)
    for name, value in (("max_batch", max_batch), ("max_kv_heads", max_kv_heads), ("max_group", max_group)):
        positive_int(name, value)
    _need_flag("decode", decode)
    st = _st()

    @st.composite
    def draw_shape(draw):
        batch = draw(st.integers(1, max_batch))
        kv_heads = draw(st.integers(1, max_kv_heads))
        group = draw(st.integers(1, max_group))
        kv_len = draw(st.sampled_from(lengths))
        if decode and draw(st.booleans()):
            q_len = draw(st.sampled_from(sorted({1, max(1, kv_len // 3), kv_len})))
        else:
            q_len = draw(st.sampled_from(lengths))
        head_dim = draw(st.sampled_from(head_dims))
        return Shape(batch, kv_heads * group, kv_heads, q_len, kv_len, head_dim)

    return draw_shape()


def make_qkv(shape: Shape, dtype=torch.float32, device="cpu", seed: int = 0, requires_grad: bool = False):
    """Random q, k, v for a Shape (layout [B, H, S, D]).

    Raises:
        AttnLangError: ``shape`` not a Shape of positive ints, a dtype that is not floating, a bad device or seed,
            or inputs too large to allocate.
    """
    if not isinstance(shape, Shape):
        raise AttnLangError(f"make_qkv takes an attnlang.testing.Shape, got {type(shape).__name__}")
    for name in ("batch", "q_heads", "kv_heads", "q_len", "kv_len", "head_dim"):
        positive_int(f"shape.{name}", getattr(shape, name))
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise AttnLangError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    device = _need_device(device)
    _need_flag("requires_grad", requires_grad)
    g = torch.Generator().manual_seed(_need_seed(seed))
    try:
        q = torch.randn(shape.batch, shape.q_heads, shape.q_len, shape.head_dim, generator=g)
        k = torch.randn(shape.batch, shape.kv_heads, shape.kv_len, shape.head_dim, generator=g)
        v = torch.randn(shape.batch, shape.kv_heads, shape.kv_len, shape.head_dim, generator=g)
        return tuple(t.to(dtype=dtype, device=device).requires_grad_(requires_grad) for t in (q, k, v))
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError, or a device that is not here
        raise AttnLangError(f"cannot make q, k, v of {shape} on {device}: {str(e).splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------------------------------
# variants: typed expression text, built bottom-up so every piece is well typed by construction

def variants(max_depth: int = 3, tensors: bool = True, score: bool = True, mask: bool = True,
             sinks: bool = False, unnormalized: bool = False, extended: bool = False):
    """Strategy of random well-typed ``Variant``s over score, b, h, q_idx, kv_idx, q_len, kv_len, constants, the
    functions and operators of LANGUAGE.md and (with ``tensors``) reads of the tensors in ``TENSOR_POOL``.

    Every generated variant runs without error on every shape: indices stay inside the tensors sized by
    ``tensors_for``, no integer division by zero, scores finite. ``score=False`` / ``mask=False`` keep that
    expression at its default. ``sinks=True``: about half the variants get a sink (LANGUAGE.md), a finite
    score-free expression of b, h, q_idx, q_len, kv_len and tensors (``0``, ``f_vec[h]``, ...). ``unnormalized=True``:
    about half get ``normalize=False`` (their scores are generated as for the others, so out stays finite).
    ``extended=True`` also draws LANGUAGE.md's later section: int bit operations (``&``, ``|``, ``^``, shifts by
    0-4), bounded reductions (``sum`` / ``max`` / ``min`` / ``any`` / ``all`` over ``range(1..4)``), ``erf`` /
    ``cos`` / ``sin``, and bindings in front of the score and the mask (the default draws stay as they were).
    """
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or not 0 <= max_depth <= MAX_DEPTH:
        raise AttnLangError(f"max_depth must be an int in [0, {MAX_DEPTH}], got {max_depth!r}")
    _need_flag("extended", extended)
    st = _st()

    @st.composite
    def draw_variant(draw):
        score_src = draw(_float_expr(max_depth, with_score=True, with_tensors=tensors, ext=extended)) \
            if score else "score"
        mask_src = draw(_bool_expr(max_depth, with_tensors=tensors, ext=extended)) if mask else "True"
        if extended and mask and draw(st.booleans()):  # a binding the result reads
            mask_src = f"mb = {draw(_int_expr(1, tensors, ext=True))}\n({mask_src}) | mb == kv_idx"
        if extended and score and draw(st.booleans()):
            score_src = f"sb = {draw(_pos_float(1, tensors, ext=True))}; {score_src} + tanh(sb)"
        sink_src = draw(st.one_of(st.none(), _sink_expr(max(0, max_depth - 1), tensors))) if sinks else None
        normalize = not draw(st.booleans()) if unnormalized else True
        return compile_variant(score_src, mask_src, sink=sink_src, normalize=normalize)

    return draw_variant()


def _sink_expr(depth: int, with_tensors: bool):
    """A finite float of the row alone: a score-free float with every ``kv_idx`` read as ``q_idx`` (the sink may
    read neither ``kv_idx`` nor ``score``); the same index bounds hold, since tensors_for sizes reads per use."""
    st = _st()
    common = st.sampled_from(("0", "0.0", "-1.5", "2.0"))
    if with_tensors:
        common = st.one_of(common, st.just("f_vec[h]"))
    row = _pos_float(depth, with_tensors).map(lambda text: text.replace("kv_idx", "q_idx"))
    return st.one_of(common, row)


def _read(st, want: str, depth: int):
    """A tensor read of element type ``want`` ("float", "int", "bool"); every index in bounds."""
    wanted = {"float": torch.float32, "int": torch.int64, "bool": torch.bool}[want]
    names = [n for n, (dt, _) in TENSOR_POOL.items() if dt == wanted]

    @st.composite
    def draw(d):
        name = d(st.sampled_from(names))
        idx = []
        for _ in range(TENSOR_POOL[name][1]):
            if depth > 0 and d(st.booleans()):
                # a computed index, clamped into the smallest size tensors_for gives any axis
                idx.append(f"clamp({d(_int_expr(depth - 1, with_tensors=False))}, 0, {_CLAMP_HI})")
            else:
                idx.append(d(st.sampled_from(_INDEX_NAMES)))
        return f"{name}[{', '.join(idx)}]"

    return draw()


_CLAMP_HI = 6   # tensors_for gives every axis at least _CLAMP_HI + 1 entries


def _int_expr(depth: int, with_tensors: bool, ext: bool = False):
    st = _st()
    leaves = [st.sampled_from(_INT_LEAVES), st.integers(-5, 20).map(str)]
    if with_tensors:
        leaves.append(_read(st, "int", 1))
    leaf = st.one_of(*leaves)
    if depth <= 0:
        return leaf

    sub = _int_expr(depth - 1, with_tensors, ext)
    kinds = ("leaf", "arith", "div", "func", "where", "int_of_float") + (("bits", "shift", "reduce") if ext else ())

    @st.composite
    def node(d):
        kind = d(st.sampled_from(kinds))
        if kind == "leaf":
            return d(leaf)
        if kind == "arith":
            op = d(st.sampled_from(("+", "-", "*")))
            return f"({d(sub)} {op} {d(sub)})"
        if kind == "div":
            op = d(st.sampled_from(("//", "%")))
            return f"({d(sub)} {op} {d(st.sampled_from(_INT_DIVISORS))})"
        if kind == "func":
            f = d(st.sampled_from(("abs", "min", "max", "clamp", "sign", "floor", "ceil")))
            if f in ("min", "max"):
                return f"{f}({d(sub)}, {d(sub)})"
            if f == "clamp":
                lo = d(st.integers(-10, 10))
                return f"clamp({d(sub)}, {lo}, {lo + d(st.integers(0, 20))})"
            return f"{f}({d(sub)})"
        if kind == "where":
            return f"where({d(_bool_expr(depth - 1, with_tensors, ext))}, {d(sub)}, {d(sub)})"
        if kind == "bits":
            return f"({d(sub)} {d(st.sampled_from(('&', '|', '^')))} {d(sub)})"
        if kind == "shift":
            return f"({d(sub)} {d(st.sampled_from(('<<', '>>')))} {d(st.integers(0, 4))})"
        if kind == "reduce":  # each depth its own variable: a nested reduction never rebinds one
            var = f"r{depth}"
            f = d(st.sampled_from(("sum", "max", "min")))
            return f"{f}(({d(sub)}) * {var} for {var} in range({d(st.integers(1, 4))}))"
        # int() of a score-free float, bounded so the conversion is exact and identical everywhere
        return f"int(clamp({d(_pos_float(depth - 1, with_tensors, ext))}, -1000.0, 1000.0))"

    return node()


def _pos_float(depth: int, with_tensors: bool, ext: bool = False):
    """A float that does not depend on the score: safe under floor/ceil/sign/int/comparisons."""
    st = _st()
    leaves = [st.sampled_from(("0.5", "1.5", "-2.25", "3.0", "0.125")),
              _int_expr(0, with_tensors).map(lambda s: f"float({s})")]
    if with_tensors:
        leaves.append(_read(st, "float", 1))
    leaf = st.one_of(*leaves)
    if depth <= 0:
        return leaf
    sub = _pos_float(depth - 1, with_tensors, ext)
    kinds = ("leaf", "arith", "round", "float_of_int") + (("trig",) if ext else ())

    @st.composite
    def node(d):
        kind = d(st.sampled_from(kinds))
        if kind == "leaf":
            return d(leaf)
        if kind == "arith":
            op = d(st.sampled_from(("+", "-", "*")))
            return f"({d(sub)} {op} {d(sub)})"
        if kind == "round":
            return f"{d(st.sampled_from(('floor', 'ceil', 'sign', 'abs')))}({d(sub)})"
        if kind == "trig":
            return f"{d(st.sampled_from(('erf', 'cos', 'sin')))}({d(sub)})"
        return f"float({d(_int_expr(depth - 1, with_tensors, ext))})"

    return node()


def _float_expr(depth: int, with_score: bool, with_tensors: bool, ext: bool = False):
    """A float expression; with the score only through continuous, finite-preserving operations."""
    st = _st()
    leaves = [_pos_float(0, with_tensors, ext)]
    if with_score:
        leaves += [st.just("score")] * 3
    leaf = st.one_of(*leaves)
    if depth <= 0:
        return leaf
    sub = _float_expr(depth - 1, with_score, with_tensors, ext)
    kinds = ("leaf", "arith", "scale", "div", "func", "minmax", "where", "pos", "pow") + (("trig",) if ext else ())

    @st.composite
    def node(d):
        kind = d(st.sampled_from(kinds))
        if kind == "leaf":
            return d(leaf)
        if kind == "arith":
            return f"({d(sub)} {d(st.sampled_from(('+', '-')))} {d(sub)})"
        if kind == "scale":
            # products stay bounded: one factor squashed into [-1, 1]
            return f"({d(sub)} * tanh({d(sub)}))"
        if kind == "div":
            return f"({d(sub)} / {d(st.sampled_from(('2.0', '-3.0', '0.75')))})" if d(st.booleans()) else \
                f"({d(sub)} / (1.0 + abs({d(sub)})))"
        if kind == "func":
            f = d(st.sampled_from(("tanh", "sigmoid", "exp_t", "exp2_t", "log_a", "log2_a", "sqrt_a", "abs")))
            x = d(sub)
            return {"tanh": f"tanh({x})", "sigmoid": f"sigmoid({x})", "exp_t": f"exp(tanh({x}))",
                    "exp2_t": f"exp2(tanh({x}))", "log_a": f"log(1.0 + abs({x}))",
                    "log2_a": f"log2(1.0 + abs({x}))", "sqrt_a": f"sqrt(abs({x}))", "abs": f"abs({x})"}[f]
        if kind == "minmax":
            f = d(st.sampled_from(("min", "max", "clamp")))
            if f == "clamp":
                return f"clamp({d(sub)}, -4.0, 4.0)"
            return f"{f}({d(sub)}, {d(sub)})"
        if kind == "where":
            return f"where({d(_bool_expr(depth - 1, with_tensors, ext))}, {d(sub)}, {d(sub)})"
        if kind == "pow":
            return f"(tanh({d(sub)}) ** 2)"
        if kind == "trig":  # bounded and smooth: the score stays finite
            return f"{d(st.sampled_from(('erf', 'cos', 'sin')))}({d(sub)})"
        return d(_pos_float(depth - 1, with_tensors, ext))

    return node()


def _bool_expr(depth: int, with_tensors: bool, ext: bool = False):
    """A bool that never reads the score (masks, and conditions of where)."""
    st = _st()
    cmp = st.sampled_from(("<", "<=", ">", ">=", "==", "!="))
    ints = _int_expr(max(0, depth - 1), with_tensors, ext)
    base = [st.tuples(ints, cmp, ints).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
            st.sampled_from(("q_idx >= kv_idx", "kv_idx <= q_idx + kv_len - q_len", "True"))]
    if with_tensors:
        base.append(_read(st, "bool", 1))
        base.append(st.tuples(_read(st, "float", 1), cmp).map(lambda t: f"({t[0]} {t[1]} 0.0)"))
    leaf = st.one_of(*base)
    if depth <= 0:
        return leaf
    sub = _bool_expr(depth - 1, with_tensors, ext)
    kinds = ("leaf", "leaf", "and", "or", "not", "chain") + (("reduce",) if ext else ())

    @st.composite
    def node(d):
        kind = d(st.sampled_from(kinds))
        if kind == "leaf":
            return d(leaf)
        if kind == "and":
            return f"({d(sub)} & {d(sub)})"
        if kind == "or":
            return f"({d(sub)} | {d(sub)})"
        if kind == "not":
            return f"~({d(sub)})"
        if kind == "reduce":
            var, f = f"a{depth}", d(st.sampled_from(("any", "all")))
            return f"{f}(({d(ints)}) == kv_idx + {var} for {var} in range({d(st.integers(1, 4))}))"
        lo = d(st.integers(-3, 5))
        return f"({lo} <= q_idx - kv_idx < {lo + d(st.integers(1, 40))})"

    return node()


# ---------------------------------------------------------------------------------------------------------------
# tensors for a variant

def _make_ids(shape, g, lo, hi, dtype):
    return torch.randint(lo, hi, shape, generator=g).to(dtype)


def _make_sorted_ids(shape, g, lo, hi, dtype):
    """Ids with repeats, sorted along the last axis: runs of equal ids (documents), several per row."""
    return torch.randint(lo, hi, shape, generator=g).sort(dim=-1).values.to(dtype)


def _make_positive(shape, g, lo, hi, dtype):
    return (1.0 - torch.rand(shape, generator=g)).to(dtype)          # (0, 1]


def _make_normal(shape, g, lo, hi, dtype):
    return torch.randn(shape, generator=g).to(dtype)


def _make_coins(shape, g, lo, hi, dtype):
    return torch.rand(shape, generator=g) < 0.5


# name -> (element kind, maker(shape, generator, int lo, int hi, torch dtype)): tensors_for's built-in strategies
TENSOR_STRATEGIES = {
    "ids": (DType.INT, _make_ids),                  # ints from int_range, with repeats
    "sorted_ids": (DType.INT, _make_sorted_ids),    # the same sorted along the last axis: document ids
    "normal": (DType.FLOAT, _make_normal),          # standard normal floats
    "positive": (DType.FLOAT, _make_positive),      # floats in (0, 1] (slopes, scales)
    "coins": (DType.BOOL, _make_coins),             # fair boolean coins
}
_KIND_OF_DTYPE = {torch.bool: DType.BOOL}


def _kind(dt: torch.dtype) -> DType:
    return _KIND_OF_DTYPE.get(dt) or (DType.FLOAT if dt.is_floating_point else DType.INT)


def _equality_tensors(checked) -> set[str]:
    """Tensors compared for equality: reads of one tensor on both sides of ``==`` / ``!=``, or a read compared with
    an int expression (a position: ``seg[kv_idx] == q_idx // 64``). Their ids mean something only when they
    repeat."""
    found: set[str] = set()
    for where in checked.wheres:
        for node in walk(checked.expr(where)):
            if not (isinstance(node, Binary) and node.op in (Op.EQ, Op.NE)):
                continue
            left, right = ({n.tensor for n in walk(side) if isinstance(n, Index)} for side in (node.left, node.right))
            found |= left & right
            for side, other in ((node.left, node.right), (node.right, node.left)):
                if isinstance(side, Index) and other.dtype is DType.INT:
                    found.add(side.tensor)
    return found


def _strategy(name: str, value) -> tuple[DType | None, Callable]:
    """(element kind or None for a user's callable, maker) of one entry of ``strategies``."""
    if isinstance(value, str):
        if value not in TENSOR_STRATEGIES:
            raise AttnLangError(f"strategies[{name!r}] = {value!r}: no such strategy; the built-in ones are "
                                f"{', '.join(sorted(TENSOR_STRATEGIES))}, or pass a callable (shape, generator) -> "
                                f"tensor")
        return TENSOR_STRATEGIES[value]
    if callable(value):
        return None, value
    raise AttnLangError(f"strategies[{name!r}] must be a strategy name ({', '.join(sorted(TENSOR_STRATEGIES))}) "
                        f"or a callable (shape, generator) -> tensor, got {type(value).__name__}")


def _tensor_dtypes(variant: Variant, dtypes: Mapping[str, torch.dtype] | None,
                   kinds: Mapping[str, DType] | None = None, prefer_int: frozenset = frozenset()
                   ) -> dict[str, torch.dtype]:
    names = variant.tensor_names
    kinds = kinds or {}
    out = {}
    unknown = []
    kind_dtype = {DType.FLOAT: torch.float32, DType.INT: torch.int64, DType.BOOL: torch.bool}
    for n in names:
        if dtypes and n in dtypes:
            out[n] = dtypes[n]
            if n in kinds and _kind(out[n]) is not kinds[n]:
                raise AttnLangError(f"tensor {n!r}: dtypes gives {out[n]} but its strategy makes "
                                    f"{kinds[n].value} values")
        elif n in kinds:
            out[n] = kind_dtype[kinds[n]]
        elif n[:2] in _PREFIX_DTYPES:
            out[n] = _PREFIX_DTYPES[n[:2]]
        else:
            unknown.append(n)
    if not unknown:
        return out
    # the first assignment (float, then int, then bool per tensor; int first for a tensor compared for equality)
    # under which the variant type-checks
    default = ((DType.FLOAT, torch.float32), (DType.INT, torch.int64), (DType.BOOL, torch.bool))
    ids_first = ((DType.INT, torch.int64), (DType.FLOAT, torch.float32), (DType.BOOL, torch.bool))
    from .check import dtype_of_torch
    fixed = {n: dtype_of_torch(t) for n, t in out.items()}
    for combo in itertools.product(*(ids_first if n in prefer_int else default for n in unknown)):
        try:
            bind(variant.checked, dict(fixed, **{n: c[0] for n, c in zip(unknown, combo)}))
        except AttnLangError:
            continue
        out.update({n: c[1] for n, c in zip(unknown, combo)})
        return out
    raise AttnLangError(f"no element types make {variant!r} type-check; pass dtypes={{name: torch.dtype}}")


def tensors_for(variant: Variant, batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu", seed: int = 0,
                dtypes: Mapping[str, torch.dtype] | None = None, int_range: tuple[int, int] = (0, 4),
                float_dtype: torch.dtype = torch.float32,
                strategies: Mapping[str, str | Callable] | None = None) -> dict[str, torch.Tensor]:
    """Random tensors for every tensor ``variant`` reads, sized so that every read stays in bounds.

    Each axis gets (largest value its index expressions can take for these sizes) + 1 entries, at least
    ``_CLAMP_HI + 1``. Element types: ``dtypes`` if given, else the kind the tensor's strategy makes, else by name
    prefix (``f_`` float, ``i_`` int64, ``m_`` bool), else the first of float / int / bool under which the variant
    type-checks, int first for a tensor compared for equality (``doc[q_idx] == doc[kv_idx]``, ``seg[kv_idx] ==
    q_idx // 64``: ids that mean something only when they repeat).

    Values, by ``strategies`` ({tensor name: strategy}) where given, else by default: a strategy is a name in
    ``TENSOR_STRATEGIES`` ("ids", "sorted_ids", "normal", "positive", "coins") or a callable ``(shape,
    generator) -> tensor`` (the shape every read needs; a torch.Generator seeded from ``seed``) returning a CPU
    or ``device`` tensor of exactly that shape. Defaults: ints from ``int_range`` (small, so equalities hold
    often), sorted along the last axis ("sorted_ids": runs, as document ids) for an int tensor compared for
    equality; floats standard normal in ``float_dtype``; bools fair coins. An int tensor whose values index
    another tensor must keep to ``int_range`` (the sizes are computed from it).

    Raises:
        AttnLangError: an index whose range is unbounded for these sizes (it reads another tensor's values
            without clamp), an int_range that is not ints lo < hi, no element types that type-check, a strategy
            that is not a known name or a callable, or one that returns something other than a tensor of the shape
            and element kind asked for.
    """
    _need_variant("tensors_for", variant)
    for name, value in (("batch", batch), ("q_heads", q_heads), ("q_len", q_len), ("kv_len", kv_len)):
        positive_int(name, value)
    _need_seed(seed)
    _need_device(device)
    lo, hi = _need_int_range(int_range)
    for arg, value in (("strategies", strategies), ("dtypes", dtypes)):
        if value is not None and not isinstance(value, Mapping):
            raise AttnLangError(f"{arg} must be a dict {{tensor name: ...}}, got {type(value).__name__}")
    for name, dt in (dtypes or {}).items():
        if not isinstance(dt, torch.dtype):
            raise AttnLangError(f"dtypes[{name!r}] must be a torch.dtype, got {dt!r}")
    strategies = dict(strategies or {})
    for name in strategies:
        if name not in variant.tensor_names:
            raise AttnLangError(f"strategies names tensor {name!r}, which the variant does not read (it reads "
                                f"{', '.join(variant.tensor_names) or 'no tensors'})")
    chosen = {n: _strategy(n, value) for n, value in strategies.items()}
    equal = _equality_tensors(variant.checked)
    types_ = _tensor_dtypes(variant, dtypes, {n: k for n, (k, _) in chosen.items() if k is not None},
                            frozenset(equal))
    env = {"b": Interval(0, batch - 1), "h": Interval(0, q_heads - 1), "q_idx": Interval(0, q_len - 1),
           "kv_idx": Interval(0, kv_len - 1), "q_len": Interval(q_len, q_len), "kv_len": Interval(kv_len, kv_len)}
    for n, dt in types_.items():
        if dt == torch.bool:
            env[n] = Interval(0, 1)
        elif dt.is_floating_point:
            env[n] = Interval(-math.inf, math.inf)
        else:
            env[n] = Interval(lo, hi - 1)
    checked = bind(variant.checked, {n: _kind(dt) for n, dt in types_.items()})
    sizes: dict[str, list[int]] = {n: [_CLAMP_HI + 1] * variant.checked.tensors[n] for n in types_}
    for _, tree in checked.checked_trees():  # unused bindings' reads too: the call checks them
        for node in walk(tree):
            if isinstance(node, Index):
                for axis, ix in enumerate(node.indices):
                    r = bounds(ix, env)
                    if not math.isfinite(r.hi):
                        raise AttnLangError(f"index {axis} of {node.tensor!r} is unbounded for these sizes; wrap "
                                            f"it in clamp(...) or pass the tensor yourself")
                    sizes[node.tensor][axis] = max(sizes[node.tensor][axis], int(r.hi) + 1)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in sorted(types_):
        dt, shape = types_[n], tuple(sizes[n])
        if dt.is_floating_point and dt == torch.float32:
            dt = float_dtype
        kind = _kind(dt)
        if n in chosen:
            maker = chosen[n][1]
        elif kind is DType.INT:
            maker = _make_sorted_ids if n in equal else _make_ids
        else:
            maker = _make_normal if kind is DType.FLOAT else _make_coins
        if chosen.get(n, (True,))[0] is None:  # a user's callable: (shape, generator)
            try:
                t = maker(shape, g)
            except AttnLangError:
                raise
            except Exception as e:  # noqa: BLE001 - the user's code failed: say which strategy
                raise AttnLangError(f"the strategy for tensor {n!r} raised {type(e).__name__}: {e}") from None
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise AttnLangError(f"the strategy for tensor {n!r} must return a tensor of shape {shape}, got {got}")
            if _kind(t.dtype) is not kind:
                raise AttnLangError(f"the strategy for tensor {n!r} returned {t.dtype}, but the variant reads it as "
                                    f"{kind.value} here ({dt}); pass dtypes={{{n!r}: {t.dtype}}} or return {dt}")
        else:
            t = maker(shape, g, lo, hi, dt)
        out[n] = t.to(device)
    return out


def named_tensors(variant: Variant, shape: Shape, strategies: Mapping[str, str | Callable] | None = None,
                  **kwargs):
    """Hypothesis strategy of ``tensors_for(variant, shape.batch, shape.q_heads, shape.q_len, shape.kv_len,
    seed=<drawn>, strategies=strategies, **kwargs)``: fresh tensor values per example, shrinking towards seed 0."""
    _need_variant("named_tensors", variant)
    if not isinstance(shape, Shape):
        raise AttnLangError(f"named_tensors takes an attnlang.testing.Shape, got {type(shape).__name__}")
    st = _st()
    return st.integers(0, 2 ** 31 - 1).map(lambda seed: tensors_for(
        variant, shape.batch, shape.q_heads, shape.q_len, shape.kv_len, seed=seed, strategies=strategies, **kwargs))


# ---------------------------------------------------------------------------------------------------------------
# agreement

def _compare(what: str, got: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float, context: str) -> None:
    if got.shape != ref.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}\n{context}")
    g, r = got.detach().double().cpu(), ref.detach().double().cpu()
    if torch.isnan(g).any():
        i = tuple(int(x) for x in torch.isnan(g).nonzero()[0])
        raise AssertionError(f"{what}: NaN at {i} (reference {r[i].item()})\n{context}")
    differ = ((g == math.inf) != (r == math.inf)) | ((g == -math.inf) != (r == -math.inf))
    if differ.any():
        i = tuple(int(x) for x in differ.nonzero()[0])
        raise AssertionError(f"{what}: infinities differ at {i}: got {g[i].item()}, reference {r[i].item()}\n"
                             f"{context}")
    fin = torch.isfinite(r)
    if not fin.any():
        return
    peak = float(r[fin].abs().max())
    scaled_atol = atol * max(1.0, peak)
    err = torch.where(fin, (g - r).abs(), torch.zeros_like(g))
    allowed = scaled_atol + rtol * r.abs()
    bad = (err > allowed) & fin
    if bad.any():
        excess = torch.where(bad, err - allowed, torch.zeros_like(err))
        i = tuple(int(x) for x in (excess == excess.max()).nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {r.numel()} elements differ beyond atol={scaled_atol:.3g} "
            f"(= {atol:g} x max(1, max|ref|={peak:.3g})) + rtol={rtol:g}*|ref|; worst at {i}: got "
            f"{g[i].item():.6g}, reference {r[i].item():.6g} (|diff| {err[i].item():.3g}); max |diff| "
            f"{float(err.max()):.3g}\n{context}")


def _tolerance_pair(dtype, value) -> tuple:
    """A tolerances entry as ((atol, rtol) for out / lse, (atol, rtol) for grads): one (atol, rtol) pair serves
    both."""
    def pair(x) -> bool:
        return (isinstance(x, (tuple, list)) and len(x) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in x))
    if pair(value):
        return (tuple(value), tuple(value))
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(pair(v) for v in value):
        return (tuple(value[0]), tuple(value[1]))
    raise AttnLangError(f"tolerances[{dtype}] must be (atol, rtol) or ((atol, rtol), (grad atol, grad rtol)) of "
                        f"non-negative numbers, got {value!r}")


def _gradients_here(variant: Variant, backend: str, q, k, v, scale, kernel_options, tensors) -> tuple[bool, bool]:
    """(q / k / v gradients, named-tensor gradients) that ``backend`` computes for this call on this device: what
    the backend's own ``unsupported()`` accepts with inputs that require grad (eager and auto: both)."""
    if backend in ("eager", "auto"):
        return True, True
    try:
        module = importlib.import_module(f"attnlang.backends.{backend}")
    except ImportError:
        return False, False  # the call itself reports why the backend cannot run

    def accepts(qkv: bool, named: bool) -> bool:
        qq, kk, vv = (t.detach().requires_grad_(qkv) for t in (q, k, v))
        bound = {n: t.detach().requires_grad_(named and t.is_floating_point()) for n, t in tensors.items()}
        with torch.set_grad_enabled(qkv or named):
            plan = variant._plan(qq, kk, vv, scale, backend, True, kernel_options, bound)
            return module.unsupported(qq, plan) is None

    if accepts(True, True):
        return True, True
    if accepts(True, False):
        return True, False
    return False, False


def assert_backends_agree(variant: Variant, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                          backend: str = "flex", reference: str = "eager", grads: bool | None = None,
                          named_grads: bool | None = None, lse_grads: bool = True,
                          scale: float | None = None, kernel_options: Mapping | None = None, seed: int = 0,
                          tolerances: Mapping | None = None, **tensors: torch.Tensor) -> tuple[str, ...]:
    """Assert that ``backend`` and ``reference`` give the same out, lse and (with ``grads``) gradients.

    Both run on copies of the inputs (the caller's tensors are untouched). Gradients are those of
    ``sum(out * g_out) + sum(lse * g_lse)`` (random cotangents from ``seed``; rows whose lse is -inf left out)
    with respect to q, k, v and every floating tensor bound by name. The reference runs in the inputs' dtype
    (the eager reference computes in float32, float64 for float64 inputs).

    Args:
        variant: the Variant to check. q, k, v: [B, Hq, Sq, D], [B, Hkv, Skv, D], [B, Hkv, Skv, Dv].
        backend, reference: backend names (``Variant.__call__``'s ``backend``).
        grads: also compare gradients. None (the default): wherever ``backend`` computes them for this call on
            this device (as its own ``unsupported()`` says: flex has no backward on the CPU, so the default call
            compares out and lse there and gradients too on CUDA); True insists (an AttnLangError where the
            backend cannot), False never.
        named_grads: with ``grads``, also differentiate the floating named tensors (flex's FLASH kernel and fa4
            cannot). None (the default): wherever the backend can, as for ``grads``.
        lse_grads: with ``grads``, put lse into the loss (flex's FLASH kernel cannot differentiate lse: False
            leaves the ``sum(lse * g_lse)`` term out; lse values are still compared).
        kernel_options: passed to the backend under test only.
        tolerances: {dtype: ((atol, rtol) for out/lse, (atol, rtol) for grads)}, or {dtype: (atol, rtol)} for
            both, overriding ``TOLERANCES``.
        **tensors: the variant's named tensors.
    Returns:
        the names of the quantities compared ("out", "lse", then "grad q", "grad k", "grad v", "grad <tensor>"),
        so a caller can see what the defaults chose.
    Raises:
        AssertionError: a mismatch, naming the quantity, the worst element, both values and the tolerance.
        AttnLangError: either backend refuses the call.
    """
    _need_variant("assert_backends_agree", variant)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise AttnLangError(f"{name} must be a floating torch.Tensor, got "
                                f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    _need_flag("grads", grads, allow_none=True)
    _need_flag("named_grads", named_grads, allow_none=True)
    _need_flag("lse_grads", lse_grads)
    _need_seed(seed)
    if isinstance(tolerances, Mapping):
        for dt in tolerances:
            if not isinstance(dt, torch.dtype):
                raise AttnLangError(f"tolerances keys must be torch dtypes (torch.float32, ...), got {dt!r}")
    if grads is None or named_grads is None:
        can_qkv, can_named = _gradients_here(variant, backend, q, k, v, scale, kernel_options, tensors)
        if grads is None:
            grads = can_qkv or (named_grads is True)
        if named_grads is None:
            named_grads = can_named
    tol = dict(TOLERANCES)
    if tolerances:
        if not isinstance(tolerances, Mapping):
            raise AttnLangError(f"tolerances must be a dict {{dtype: (atol, rtol)}}, got {type(tolerances).__name__}")
        tol.update({dt: _tolerance_pair(dt, value) for dt, value in tolerances.items()})
    (atol, rtol), (gatol, grtol) = tol[q.dtype]
    context = (f"variant: score={variant.canonical[0]!r}, mask={variant.canonical[1]!r}; backend {backend!r} vs "
               f"{reference!r}; q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, {q.dtype}, "
               f"{q.device}; tensors " + ", ".join(f"{n}{tuple(t.shape)}:{t.dtype}" for n, t in tensors.items()))

    def run(name: str, opts):
        qq, kk, vv = (t.detach().clone().requires_grad_(grads) for t in (q, k, v))
        named = {n: (t.detach().clone().requires_grad_(True) if grads and named_grads and t.is_floating_point() else
                     t.detach().clone()) for n, t in tensors.items()}
        with torch.set_grad_enabled(grads):
            out, lse = variant(qq, kk, vv, scale=scale, backend=name, return_lse=True, kernel_options=opts,
                               **named)
        result = {"out": out.detach(), "lse": lse.detach()}
        if grads:
            gen = torch.Generator().manual_seed(seed)
            g_out = torch.randn(out.shape, generator=gen).to(device=out.device, dtype=out.dtype)
            g_lse = torch.randn(lse.shape, generator=gen).to(device=lse.device)
            finite = torch.isfinite(lse)
            loss = (out * g_out).float().sum()
            if lse_grads:
                loss = loss + (torch.where(finite, lse, torch.zeros_like(lse)) * g_lse).sum()
            leaves = {"q": qq, "k": kk, "v": vv, **{n: t for n, t in named.items() if t.requires_grad}}
            got = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            for (n, t), g in zip(leaves.items(), got):
                result[f"grad {n}"] = torch.zeros_like(t) if g is None else g
        return result

    ref = run(reference, None)
    got = run(backend, kernel_options)
    lse_tol = tuple(max(a, b) for a, b in zip((atol, rtol), tol[torch.float32][0]))  # lse is float32 always
    for what in ref:
        a, r = (atol, rtol) if what == "out" else lse_tol if what == "lse" else (gatol, grtol)
        _compare(what, got[what], ref[what], a, r, context)
    return tuple(ref)
