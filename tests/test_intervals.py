"""intervals.bounds: sound on random expressions (every evaluated value lies in the interval)."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlang.check import bind, check
from attnlang.intervals import BOOL, FALSE, TOP, TRUE, Interval, bounds
from attnlang.lower_torch import evaluate


def test_constants_and_names():
    assert TRUE == Interval(1, 1) and FALSE == Interval(0, 0) and BOOL == Interval(0, 1)
    assert TOP.lo == -math.inf and TOP.hi == math.inf
    c = check("score", "q_idx - kv_idx >= 3")
    env = {"q_idx": Interval(0, 9), "kv_idx": Interval(0, 9)}
    assert bounds(c.mask.left, env) == Interval(-9, 9)
    assert bounds(c.mask, env) == BOOL
    assert bounds(c.mask, {"q_idx": Interval(5, 9), "kv_idx": Interval(0, 2)}) == TRUE


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
    c = bind(check("score", f"{expr} >= 0"), {"t": __import__("attnlang").ast.DType.INT})
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
