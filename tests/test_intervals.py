"""The interval arithmetic of attnlang.intervals, in one place: one table of operator rules (RULES) that serves
the scalar bounds (``bounds``: the checks) and the per-block bounds of the block-sparsity analysis (tensors of
bounds, float32 device semantics). Soundness by Hypothesis: random expressions, random points inside the bounds of
their inputs, evaluated as the backends evaluate them -> every value inside the computed bounds (and NaN only where
the bounds say NaN may occur)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlang
from attnlang.ast import Binary, Call, Const, DType, Index, Op, Unary, walk
from attnlang.check import Checked, bind, check, check_index_bounds
from attnlang.errors import AttnLangError
from attnlang.intervals import BOOL, FALSE, RULES, TENSOR, TOP, TRUE, Interval, apply, bounds, ctx
from attnlang.lower_torch import evaluate
from attnlang.printer import to_source


def test_constants_and_names():
    assert TRUE == Interval(1, 1) and FALSE == Interval(0, 0) and BOOL == Interval(0, 1)
    assert TOP.lo == -math.inf and TOP.hi == math.inf
    c = check("score", "q_idx - kv_idx >= 3")
    env = {"q_idx": Interval(0, 9), "kv_idx": Interval(0, 9)}
    assert bounds(c.mask.left, env) == Interval(-9, 9)
    assert bounds(c.mask, env) == BOOL
    assert bounds(c.mask, {"q_idx": Interval(5, 9), "kv_idx": Interval(0, 2)}) == TRUE


def test_a_square_is_never_negative():
    # x * x took the corners' product ([-6, 9] for x in [-2, 3]), so 1.0 / (t[q_idx] * t[q_idx] + 0.5) looked like a
    # division by a value that can be 0, and int() of it was refused as "can be NaN" for any float tensor t
    c = check("score", "q_idx * q_idx + (q_idx - kv_idx) * (q_idx - kv_idx) >= 3")
    env = {"q_idx": Interval(-2, 3), "kv_idx": Interval(0, 1)}
    assert bounds(c.mask.left.left, env) == Interval(0, 9)
    assert bounds(c.mask.left.right, env) == Interval(0, 9)  # q_idx - kv_idx in [-3, 3]
    assert bounds(check("score * score").score, {"score": Interval(-2.0, 0.5)}) == Interval(0.0, 4.0)
    variant = attnlang.compile(mask="int(clamp(1.0 / (t[q_idx] * t[q_idx] + 0.5), -30.0, 30.0)) >= kv_idx")
    q = torch.randn(1, 1, 6, 4, dtype=torch.float64)
    t = torch.tensor([-1.5, -0.2, 0.0, 0.3, 1.0, 2.0], dtype=torch.float64)
    allowed = (1.0 / (t * t + 0.5)).trunc().view(6, 1) >= torch.arange(6)
    s = (q @ q.transpose(-1, -2) / 2.0).masked_fill(~allowed, -math.inf)
    for backend in ("eager", "flex"):
        out = variant(q, q, q, t=t, backend=backend)
        torch.testing.assert_close(out, torch.softmax(s, -1) @ q)


def _ints():
    leaves = st.sampled_from(["q_idx", "kv_idx", "h", "t[q_idx]", "2", "-3", "7"])
    return st.recursive(leaves, lambda s: st.one_of(
        st.tuples(s, st.sampled_from(["+", "-", "*"]), s).map(lambda x: f"({x[0]} {x[1]} {x[2]})"),
        st.tuples(s, st.sampled_from(["//", "%"]), st.sampled_from(["3", "-2", "5"])).map(
            lambda x: f"({x[0]} {x[1]} {x[2]})"),
        s.map(lambda a: f"abs({a})"),
        st.tuples(st.sampled_from(["min", "max"]), s, s).map(lambda x: f"{x[0]}({x[1]}, {x[2]})"),
        s.map(lambda a: f"int(tanh(float({a}) * 0.1) * 10.0)"),
    ), max_leaves=5)


@settings(max_examples=150, deadline=None)
@given(expr=_ints(), lo=st.integers(-5, 5), width=st.integers(0, 6))
def test_bounds_sound(expr, lo, width):
    c = bind(check("score", f"{expr} >= 0"), {"t": attnlang.ast.DType.INT})
    e = c.mask.left
    t = torch.arange(-4, 8)
    env = {"q_idx": Interval(max(lo, 0), max(lo, 0) + width), "kv_idx": Interval(0, width), "h": Interval(1, 2),
           "t": Interval(-4, 7)}
    r = bounds(e, env)
    q = torch.arange(max(lo, 0), max(lo, 0) + width + 1).view(-1, 1, 1)
    k = torch.arange(0, width + 1).view(1, -1, 1)
    h = torch.arange(1, 3).view(1, 1, -1)
    val = evaluate(e, {"q_idx": q, "kv_idx": k, "h": h}, {"t": t}, torch.float64)
    assert float(val.min()) >= r.lo and float(val.max()) <= r.hi


# ---------------------------------------------------------------------------------------------------------------
# random expressions over int and float inputs, each input a tensor read x[q_idx, kv_idx]: row q_idx holds points
# of the q_idx-th interval (its ends and points between), so one evaluation checks N intervals at once

N, M = 4, 6
_INT_ENDS = [-100, -7, -3, -1, 0, 1, 2, 5, 9, 100]
_FLOAT_ENDS = [-math.inf, -1e30, -100.0, -3.5, -1.0, -0.25, 0.0, 0.5, 1.0, 2.0, 7.25, 100.0, 1e30, math.inf]


def _exprs():
    ints = st.sampled_from(["i1[q_idx, kv_idx]", "i2[q_idx, kv_idx]", "3", "-2"])
    floats = st.sampled_from(["f1[q_idx, kv_idx]", "f2[q_idx, kv_idx]", "0.5", "-2.0"])

    def grow(children):
        i, f = children.map(lambda p: p[0]), children.map(lambda p: p[1])
        return st.tuples(
            st.one_of(
                st.tuples(i, st.sampled_from(["+", "-", "*"]), i).map(lambda x: f"({x[0]} {x[1]} {x[2]})"),
                st.tuples(i, st.sampled_from(["//", "%"]), st.sampled_from(["3", "-2", "7", "i3[q_idx, kv_idx]"]))
                .map(lambda x: f"({x[0]} {x[1]} {x[2]})"),
                st.tuples(st.sampled_from(["abs", "-"]), i).map(lambda x: f"{x[0]}({x[1]})"),
                st.tuples(st.sampled_from(["min", "max"]), i, i).map(lambda x: f"{x[0]}({x[1]}, {x[2]})"),
                st.tuples(i, i, i).map(lambda x: f"clamp({x[0]}, {x[1]}, {x[2]})"),
                f.map(lambda a: f"int({a})"),
                st.tuples(st.sampled_from(["floor", "ceil"]), f).map(lambda x: f"int({x[0]}({x[1]}))"),
                st.tuples(i, i, i, i).map(lambda x: f"where({x[0]} < {x[1]}, {x[2]}, {x[3]})"),
                st.sampled_from(["i1[q_idx, kv_idx] ** 2", "i2[q_idx, kv_idx] ** 3"]),
            ),
            st.one_of(
                st.tuples(f, st.sampled_from(["+", "-", "*", "/", "//", "%"]), f).map(
                    lambda x: f"({x[0]} {x[1]} {x[2]})"),
                st.tuples(f, st.sampled_from(["+", "*", "/"]), i).map(lambda x: f"({x[0]} {x[1]} float({x[2]}))"),
                st.tuples(st.sampled_from(["exp", "exp2", "log", "log2", "sqrt", "tanh", "sigmoid", "floor", "ceil",
                                           "sign", "abs", "-"]), f).map(lambda x: f"{x[0]}({x[1]})"),
                st.tuples(st.sampled_from(["min", "max"]), f, f).map(lambda x: f"{x[0]}({x[1]}, {x[2]})"),
                st.tuples(f, st.sampled_from(["2", "3", "0.5", "f3[q_idx, kv_idx]"])).map(
                    lambda x: f"({x[0]} ** {x[1]})"),
                st.tuples(f, f, f).map(lambda x: f"clamp({x[0]}, {x[1]}, {x[2]})"),
            ))

    return st.recursive(st.tuples(ints, floats), grow, max_leaves=4).flatmap(
        lambda pair: st.sampled_from([pair[0], pair[1]]))


def _tensor(draw, ends, integer: bool):
    """[N, M] values, row r inside the r-th interval [lo_r, hi_r] (both ends included)."""
    rows, los, his = [], [], []
    for _ in range(N):
        a, b = sorted((draw(st.sampled_from(ends)), draw(st.sampled_from(ends))))
        if integer:
            inner = [draw(st.integers(a, b)) for _ in range(M - 2)]
        else:
            lo_f, hi_f = max(a, -1e30), min(b, 1e30)
            inner = [draw(st.floats(min(lo_f, hi_f), max(lo_f, hi_f))) if lo_f <= hi_f else a for _ in range(M - 2)]
        rows.append([a, b] + inner)
        los.append(a)
        his.append(b)
    dtype = torch.int64 if integer else torch.float64
    return torch.tensor(rows, dtype=dtype), los, his


@st.composite
def _cases(draw):
    expr = draw(_exprs())
    tensors, ranges = {}, {}
    for name in ("i1", "i2", "i3", "f1", "f2", "f3"):
        integer = name[0] == "i"
        ends = _INT_ENDS if integer else _FLOAT_ENDS
        if name == "i3":  # a divisor that keeps one sign
            ends = draw(st.sampled_from([[1, 2, 5, 9], [-9, -3, -1]]))
        if name == "f3":  # an exponent
            ends = [-2.0, -0.5, 0.0, 0.5, 1.0, 2.0]
        t, los, his = _tensor(draw, ends, integer)
        tensors[name], ranges[name] = t, (los, his)
    return expr, tensors, ranges


def _typed(expr: str):
    dtypes = {n: DType.INT if n[0] == "i" else DType.FLOAT for n in ("i1", "i2", "i3", "f1", "f2", "f3")}
    return bind(check("score", f"{expr} == 0"), dtypes).mask.left


def _accepted(e, env) -> bool:
    """Whether a call with these value ranges passes the call checks (int() of a float past int64, int // or % by
    a possible 0 and int overflow are errors there, so no bound is needed for them)."""
    checked = Checked(Const(0.0, DType.FLOAT), Binary(Op.EQ, e, Const(0, DType.INT), dtype=DType.BOOL), {}, {
        "score": "score", "mask": to_source(e) + " == 0"})
    env = dict(env, q_idx=Interval(0, N - 1), kv_idx=Interval(0, M - 1))
    try:
        check_index_bounds(checked, env, {n: (N, M) for n in ("i1", "i2", "i3", "f1", "f2", "f3")})
    except AttnLangError:
        return False
    for node in walk(e):  # int() of inf: a known limit left as is (LANGUAGE.md gives it no value; torch: garbage)
        if isinstance(node, Call) and node.func == "int" and node.args[0].dtype is DType.FLOAT:
            r = bounds(node.args[0], env)
            if not (math.isfinite(r.lo) and math.isfinite(r.hi)):
                return False
    return True


def _names():
    return {"q_idx": torch.arange(N).view(-1, 1), "kv_idx": torch.arange(M).view(1, -1)}


def _inside(val: torch.Tensor, lo: float, hi: float, rel: float) -> bool:
    lo, hi = float(lo), float(hi)  # exact int bounds can pass what torch compares with (floor of 1e28)
    v = val[~torch.isnan(val)].double()
    if v.numel() == 0:
        return True
    slack = rel * torch.clamp(v.abs(), min=1.0)
    slack = torch.where(torch.isinf(v), torch.zeros_like(slack), slack)
    return bool(((v >= lo - slack) & (v <= hi + slack)).all())


@settings(max_examples=200, deadline=None)
@given(case=_cases())
def test_scalar_bounds_sound_on_random_expressions(case):
    """bounds(): exact arithmetic (float64 evaluation); every value that is not NaN lies inside."""
    expr, tensors, ranges = case
    e = _typed(expr)
    with torch.no_grad():
        val = evaluate(e, _names(), tensors, torch.float64)
    val = val.expand(N, M)
    for r in range(N):
        env = {n: Interval(ranges[n][0][r], ranges[n][1][r]) for n in tensors}
        if not _accepted(e, env):
            continue
        got = bounds(e, env)
        assert _inside(val[r], got.lo, got.hi, 1e-9), (expr, r, got, val[r])


def _tensor_bounds(node, leaves):
    """The per-row bounds of a numeric expression under TENSOR rules with device (float32) semantics, as the
    block-sparsity analysis computes them (its ``where`` is its own: conditions are block kinds)."""
    if isinstance(node, Const):
        v = float(node.value)
        return (v, v, False)
    if isinstance(node, Index):
        return leaves[node.tensor]
    if isinstance(node, Unary):
        return apply(Op.NEG, TENSOR, ctx(device=True), [_tensor_bounds(node.operand, leaves)])
    if isinstance(node, Binary):
        args = [_tensor_bounds(node.left, leaves), _tensor_bounds(node.right, leaves)]
        return apply(node.op, TENSOR, ctx(node.dtype is DType.INT, True), args)
    assert isinstance(node, Call)
    if node.func == "where":
        a, b = _tensor_bounds(node.args[1], leaves), _tensor_bounds(node.args[2], leaves)
        return (torch.minimum(TENSOR.t(a[0]), TENSOR.t(b[0])), torch.maximum(TENSOR.t(a[1]), TENSOR.t(b[1])),
                a[2] or b[2])
    args = [_tensor_bounds(a, leaves) for a in node.args]
    return apply(node.func, TENSOR, ctx(node.dtype is DType.INT, True, node.args[0].dtype is DType.FLOAT), args)


@settings(max_examples=200, deadline=None)
@given(case=_cases())
def test_tensor_bounds_sound_on_random_expressions(case):
    """RULES over [N, 1] tensors of bounds (one interval per row), evaluated in float32 as the backends do: every
    value inside (up to the float comparison margin the analysis adds), NaN only where ``nan`` is set."""
    expr, tensors, ranges = case
    e = _typed(expr)
    with torch.no_grad():
        val = evaluate(e, _names(), tensors, torch.float32).expand(N, M)
    leaves = {n: (torch.tensor(lo, dtype=torch.float64).view(-1, 1), torch.tensor(hi, dtype=torch.float64).view(-1, 1),
                  False) for n, (lo, hi) in ranges.items()}
    lo, hi, nan = _tensor_bounds(e, leaves)
    lo, hi = TENSOR.t(lo).expand(N, 1), TENSOR.t(hi).expand(N, 1)
    if bool(torch.isnan(val).any()):
        assert nan, (expr, val)
    for r in range(N):
        if not _accepted(e, {n: Interval(ranges[n][0][r], ranges[n][1][r]) for n in tensors}):
            continue
        assert _inside(val[r], float(lo[r, 0]), float(hi[r, 0]), 1e-5), (expr, r, lo[r], hi[r], val[r])


# ---------------------------------------------------------------------------------------------------------------
# the rows for LANGUAGE.md's later additions (issue 20): erf, cos, sin, int & | ^ << >>

_PLANNED_FLOAT = {"erf": torch.erf, "cos": torch.cos, "sin": torch.sin}
_PLANNED_INT = {Op.BITAND: torch.bitwise_and, Op.BITOR: torch.bitwise_or, Op.XOR: torch.bitwise_xor,
                Op.LSHIFT: torch.bitwise_left_shift, Op.RSHIFT: torch.bitwise_right_shift}


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(sorted(_PLANNED_FLOAT)), a=st.floats(-50, 50), width=st.floats(0, 8),
       points=st.lists(st.floats(0, 1), min_size=1, max_size=8))
def test_planned_float_rows_sound(name, a, width, points):
    lo, hi = a, a + width
    xs = torch.tensor([lo, hi] + [lo + p * (hi - lo) for p in points], dtype=torch.float64)
    for ops_values, exact in ((xs, True), (xs.float(), False)):
        val = _PLANNED_FLOAT[name](ops_values).double()
        scalar = apply(name, attnlang.intervals.SCALAR, ctx(), [(lo, hi, False)])
        tensor = apply(name, TENSOR, ctx(device=True, arg_float=True),
                       [(torch.tensor([lo], dtype=torch.float64), torch.tensor([hi], dtype=torch.float64), False)])
        for r_lo, r_hi in ((scalar[0], scalar[1]), (float(TENSOR.t(tensor[0])[0]), float(TENSOR.t(tensor[1])[0]))):
            assert bool((val >= r_lo - (1e-12 if exact else 1e-6)).all()) and bool(
                (val <= r_hi + (1e-12 if exact else 1e-6)).all()), (name, lo, hi, r_lo, r_hi, val)
    wide = apply(name, attnlang.intervals.SCALAR, ctx(), [(-math.inf, 0.0, False)])
    assert wide[2] and wide[0] <= -1 + 1e-6 if name != "erf" else wide == (-1.0, -0.0, False) or wide[0] == -1.0


def test_planned_float_rows_are_tight_between_extrema():
    lo, hi, _ = apply("cos", attnlang.intervals.SCALAR, ctx(), [(0.5, 1.0, False)])
    assert math.cos(1.0) - 1e-5 <= lo <= math.cos(1.0) and math.cos(0.5) <= hi <= math.cos(0.5) + 1e-5
    assert apply("sin", attnlang.intervals.SCALAR, ctx(), [(0.0, 4.0, False)])[1] == 1.0
    assert apply("erf", attnlang.intervals.SCALAR, ctx(), [(0.0, 1.0, False)])[:2] == (0.0, math.erf(1.0))


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(list(_PLANNED_INT)), x=st.tuples(st.integers(-300, 300), st.integers(0, 300)),
       y=st.tuples(st.integers(-300, 300), st.integers(0, 300)), seed=st.integers(0, 2 ** 16))
def test_planned_int_rows_sound(name, x, y, seed):
    xlo, xhi = x[0], x[0] + x[1]
    ylo, yhi = y[0], y[0] + y[1]
    if name in (Op.LSHIFT, Op.RSHIFT):  # shift counts in [0, 63]; a negative one is an error of the checker
        ylo, yhi = abs(y[0]) % 20, abs(y[0]) % 20 + y[1] % 20
    g = torch.Generator().manual_seed(seed)
    xs = torch.cat([torch.tensor([xlo, xhi]), torch.randint(xlo, xhi + 1, (30,), generator=g)])
    ys = torch.cat([torch.tensor([ylo, yhi]), torch.randint(ylo, yhi + 1, (30,), generator=g)])
    val = _PLANNED_INT[name](xs.view(-1, 1), ys.view(1, -1))
    scalar = apply(name, attnlang.intervals.SCALAR, ctx(integer=True), [(xlo, xhi, False), (ylo, yhi, False)])
    t = [(torch.tensor([float(lo)], dtype=torch.float64), torch.tensor([float(hi)], dtype=torch.float64), False)
         for lo, hi in ((xlo, xhi), (ylo, yhi))]
    tensor = apply(name, TENSOR, ctx(integer=True, device=True), t)
    for lo, hi in ((scalar[0], scalar[1]), (float(TENSOR.t(tensor[0]).reshape(-1)[0]),
                                            float(TENSOR.t(tensor[1]).reshape(-1)[0]))):
        assert int(val.min()) >= lo and int(val.max()) <= hi, (name, (xlo, xhi), (ylo, yhi), (lo, hi))


# ---------------------------------------------------------------------------------------------------------------
# the subtleties both users rely on

@pytest.mark.parametrize("device", [False, True])
def test_python_sign_mod_and_floordiv(device):
    ops = TENSOR if device else attnlang.intervals.SCALAR

    def run(key, x, y, integer=True):
        # on the device the dividend is per block (a tensor) and a constant divisor a Python number, as the
        # block-sparsity analysis passes them
        args = [(torch.tensor([float(x[0])]).double(), torch.tensor([float(x[1])]).double(), False) if device
                else (x[0], x[1], False), (y[0], y[1], False)]
        lo, hi, nan = apply(key, ops, ctx(integer, device), args)
        return float(TENSOR.t(lo).reshape(-1)[0]), float(TENSOR.t(hi).reshape(-1)[0]), nan

    assert run(Op.MOD, (-7, -7), (2, 2))[:2] == (1, 1)              # -7 % 2 == 1
    assert run(Op.FLOORDIV, (-7, -7), (2, 2))[:2] == (-4, -4)       # -7 // 2 == -4
    assert run(Op.MOD, (3, 5), (-4, -4))[:2] == (-3, 0)             # the divisor's sign
    assert run(Op.MOD, (1000, 1010), (1000, 1000))[:2] == (0, 10)   # one quotient over the range: exact
    assert run(Op.MOD, (0, 2000), (1000, 1000))[:2] == (0, 999)     # wraps
    assert run(Op.FLOORDIV, (0, 10), (-1, 1))[2] is False           # int // by maybe 0: unbounded (a checker error)
    lo, hi, nan = run(Op.MUL, (0, 0), (1, math.inf), integer=False)
    assert nan or (lo, hi) == (-math.inf, math.inf)                 # float 0 * inf is NaN
    assert run(Op.MUL, (0, 0), (1, math.inf))[:2] == (0, 0)         # an int's infinite bound is never met
    lo, hi, nan = run(Op.MOD, (math.inf, math.inf), (2, 2), integer=False)
    assert nan or (lo, hi) == (-math.inf, math.inf)                 # inf % y is NaN


def test_float32_rounding_of_floor_on_the_device():
    x = (torch.tensor([2.0 ** 24 + 1]).double(), torch.tensor([2.0 ** 24 + 1]).double(), False)
    lo, hi, _ = apply("floor", TENSOR, ctx(device=True, arg_float=True), [x])
    assert float(lo[0]) <= 2.0 ** 24 <= float(hi[0])                # float32 holds 2**24 + 1 as 2**24
    exact = apply("floor", attnlang.intervals.SCALAR, ctx(), [(2.5, 3.5, False)])
    assert exact[:2] == (2, 3)
    lo, hi, _ = apply("int", TENSOR, ctx(integer=True, device=True, arg_float=True),
                      [(torch.tensor([1e30]).double(), torch.tensor([1e30]).double(), False)])
    assert float(lo[0]) == -math.inf and float(hi[0]) == math.inf    # int() past int64: any int on the device


def test_every_rule_has_a_row_name():
    planned = {"erf", "cos", "sin", Op.BITAND, Op.BITOR, Op.XOR, Op.LSHIFT, Op.RSHIFT}
    assert planned <= set(RULES)
    arithmetic = {Op.NEG, Op.ADD, Op.SUB, Op.MUL, Op.TRUEDIV, Op.FLOORDIV, Op.MOD, Op.POW}
    assert arithmetic <= set(RULES)
    from attnlang.ast import FUNCTIONS
    assert set(FUNCTIONS) - {"where"} <= set(RULES)


_POS = st.sampled_from(["q_idx", "kv_idx", "q_idx + kv_idx", "q_idx - 3", "2 * kv_idx", "5", "-1"])
_CMP = st.sampled_from(["<", "<=", ">", ">=", "==", "!="])


@st.composite
def _guarded(draw):
    """where(<a condition on q_idx / kv_idx>, x, y) with int x, y: the branch values are bounded under their
    conditions (where(q_idx < 4, q_idx, 0) is in [0, 3])."""
    def cmp():
        return f"({draw(_POS)} {draw(_CMP)} {draw(_POS)})"
    cond = cmp()
    for _ in range(draw(st.integers(0, 2))):
        cond = f"({cond} {draw(st.sampled_from(['&', '|']))} {'~' if draw(st.booleans()) else ''}{cmp()})"
    return f"where({cond}, {draw(_POS)}, {draw(_POS)})"


@settings(max_examples=300, deadline=None)
@given(expr=_guarded(), lo=st.integers(0, 6), width=st.integers(0, 6))
def test_where_values_bounded_under_their_conditions_are_sound(expr, lo, width):
    e = bind(check("score", f"{expr} == 0"), {}).mask.left
    q, kv = torch.arange(lo, lo + width + 1).view(-1, 1), torch.arange(0, 9).view(1, -1)
    with torch.no_grad():
        val = evaluate(e, {"q_idx": q, "kv_idx": kv}, {}, torch.float64).expand(q.shape[0], kv.shape[1])
    got = bounds(e, {"q_idx": Interval(lo, lo + width), "kv_idx": Interval(0, 8)})
    assert got.lo <= int(val.min()) and int(val.max()) <= got.hi, (expr, got, val)


def test_where_narrows_a_branch_by_its_condition():
    e = bind(check("score", "where(q_idx < 4, q_idx, 0) == 0"), {}).mask.left
    assert bounds(e, {"q_idx": Interval(0, 99)}) == Interval(0, 3)
    e = bind(check("score", "where(~(q_idx > 3) & (kv_idx >= 2), q_idx + kv_idx, 1) == 0"), {}).mask.left
    assert bounds(e, {"q_idx": Interval(0, 99), "kv_idx": Interval(0, 5)}) == Interval(1, 8)
