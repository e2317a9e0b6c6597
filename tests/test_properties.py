"""Properties over random well-typed expressions.

The strategy builds each expression twice at once: its text, and a closure that evaluates it on dense float64 /
int64 / bool grids with Python's semantics (floor // and % with Python's signs, int() truncating toward zero, int
op int staying int, `/` giving float). The closures are this file's own small interpreter; they share nothing with
attnlang.lower_torch. Checked: (a) the print/parse round trip of the parsed text; (b) the eager backend equals
softmax attention computed densely from the closures' scores and mask.
"""

import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import attnlang as al
from attnlang.parse import parse
from attnlang.printer import to_source

B, HQ, HKV, D = 2, 4, 2, 4


# ----- the independent interpreter: Python semantics on tensors -----

def _floordiv_int(a, c):
    return torch.floor(a.double() / c).long()


def _mod_int(a, c):
    return a - c * _floordiv_int(a, c)


def _mod_float(a, c):
    r = torch.fmod(a, c)  # Python: the remainder takes the divisor's sign
    return torch.where((r != 0) & ((r < 0) != (c < 0)), r + c, r)


def _f(x):
    return x.double() if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=torch.float64)


def _i(x):
    return x.long() if isinstance(x, torch.Tensor) else torch.tensor(int(x), dtype=torch.int64)


def node(text, fn):
    return (text, fn)


# ----- the strategies: (text, closure) per type -----

INT_NAMES = ["q_idx", "kv_idx", "b", "h", "q_len", "kv_len"]
FLOAT_CONSTS = [0.5, -1.25, 2.0, 0.0, 3.0, 0.001, -0.75]


def _int_leaf():
    return st.one_of(
        st.sampled_from(INT_NAMES).map(lambda n: node(n, lambda e, n=n: e[n])),
        st.integers(-5, 20).map(lambda c: node(f"({c})", lambda e, c=c: _i(c))),
        st.just(node("ti[kv_idx]", lambda e: e["ti"][e["kv_idx"]])),
    )


def _float_leaf():
    return st.one_of(
        st.just(node("score", lambda e: e["score"])),
        st.sampled_from(FLOAT_CONSTS).map(lambda c: node(f"({c!r})", lambda e, c=c: _f(c))),
        st.just(node("tf[h]", lambda e: e["tf"][e["h"]])),
    )


def _bool_leaf():
    return st.one_of(
        st.booleans().map(lambda v: node(str(v), lambda e, v=v: torch.tensor(v))),
        st.just(node("tb[q_idx]", lambda e: e["tb"][e["q_idx"]])),
        st.just(node("(q_idx >= kv_idx)", lambda e: e["q_idx"] >= e["kv_idx"])),
    )


NONZERO = st.integers(-7, 7).filter(lambda c: c != 0)
NONZERO_FLOAT = st.sampled_from([0.5, -1.5, 2.0, 3.0, -4.0])


def _int_nodes(I, F, Bo):
    def bin_(sym, f):
        return st.tuples(I, I).map(lambda t: node(f"({t[0][0]} {sym} {t[1][0]})",
                                                  lambda e, a=t[0][1], b=t[1][1]: f(a(e), b(e))))
    return st.one_of(
        bin_("+", lambda a, b: a + b), bin_("-", lambda a, b: a - b), bin_("*", lambda a, b: a * b),
        st.tuples(I, NONZERO).map(lambda t: node(f"({t[0][0]} // ({t[1]}))",
                                                 lambda e, a=t[0][1], c=t[1]: _floordiv_int(a(e), c))),
        st.tuples(I, NONZERO).map(lambda t: node(f"({t[0][0]} % ({t[1]}))",
                                                 lambda e, a=t[0][1], c=t[1]: _mod_int(a(e), c))),
        st.tuples(I, st.integers(0, 2)).map(lambda t: node(f"({t[0][0]} ** {t[1]})",
                                                           lambda e, a=t[0][1], n=t[1]: a(e) ** n)),
        I.map(lambda a: node(f"(-{a[0]})", lambda e, a=a[1]: -a(e))),
        I.map(lambda a: node(f"abs({a[0]})", lambda e, a=a[1]: torch.abs(a(e)))),
        I.map(lambda a: node(f"sign({a[0]})", lambda e, a=a[1]: _i(a(e) > 0) - _i(a(e) < 0))),
        I.map(lambda a: node(f"floor({a[0]})", lambda e, a=a[1]: a(e))),
        st.tuples(I, I).map(lambda t: node(f"min({t[0][0]}, {t[1][0]})",
                                           lambda e, a=t[0][1], b=t[1][1]: torch.minimum(a(e), b(e)))),
        st.tuples(I, I).map(lambda t: node(f"max({t[0][0]}, {t[1][0]})",
                                           lambda e, a=t[0][1], b=t[1][1]: torch.maximum(a(e), b(e)))),
        st.tuples(I, st.integers(-3, 3), st.integers(0, 6)).map(
            lambda t: node(f"clamp({t[0][0]}, {t[1]}, {t[1] + t[2]})",
                           lambda e, a=t[0][1], lo=t[1], hi=t[1] + t[2]: torch.clamp(a(e), lo, hi))),
        F.map(lambda a: node(f"int(clamp({a[0]}, -1000.0, 1000.0))",
                             lambda e, a=a[1]: torch.trunc(torch.clamp(_f(a(e)), -1000.0, 1000.0)).long())),
        Bo.map(lambda a: node(f"int({a[0]})", lambda e, a=a[1]: _i(a(e)))),
        st.tuples(Bo, I, I).map(lambda t: node(f"where({t[0][0]}, {t[1][0]}, {t[2][0]})",
                                               lambda e, c=t[0][1], a=t[1][1], b=t[2][1]:
                                               torch.where(c(e), _i(a(e)), _i(b(e))))),
    )


def _float_nodes(I, F, Bo):
    num = st.one_of(I.map(lambda x: (x, _f)), F.map(lambda x: (x, _f)))

    def bin_(sym, f):
        # at least one side float: int op float is float
        return st.one_of(st.tuples(F, F), st.tuples(F, I), st.tuples(I, F)).map(
            lambda t: node(f"({t[0][0]} {sym} {t[1][0]})",
                           lambda e, a=t[0][1], b=t[1][1]: f(_f(a(e)), _f(b(e)))))

    def fn1(name, f, wrap=lambda s: s):
        return F.map(lambda a: node(f"{name}({wrap(a[0])})", lambda e, a=a[1]: f(_f(a(e)))))
    return st.one_of(
        bin_("+", lambda a, b: a + b), bin_("-", lambda a, b: a - b), bin_("*", lambda a, b: a * b),
        num.flatmap(lambda x: NONZERO_FLOAT.map(lambda c: node(
            f"({x[0][0]} / {c!r})", lambda e, a=x[0][1], c=c: _f(a(e)) / c))),
        st.tuples(I, NONZERO).map(lambda t: node(f"({t[0][0]} / ({t[1]}))",
                                                 lambda e, a=t[0][1], c=t[1]: _f(a(e)) / c)),
        st.tuples(F, NONZERO_FLOAT).map(lambda t: node(f"({t[0][0]} // {t[1]!r})",
                                                       lambda e, a=t[0][1], c=t[1]: torch.floor(_f(a(e)) / c))),
        st.tuples(F, NONZERO_FLOAT).map(lambda t: node(f"({t[0][0]} % {t[1]!r})",
                                                       lambda e, a=t[0][1], c=t[1]: _mod_float(_f(a(e)), c))),
        F.map(lambda a: node(f"({a[0]} ** 2)", lambda e, a=a[1]: _f(a(e)) ** 2)),
        F.map(lambda a: node(f"(-{a[0]})", lambda e, a=a[1]: -_f(a(e)))),
        I.map(lambda a: node(f"float({a[0]})", lambda e, a=a[1]: _f(a(e)))),
        Bo.map(lambda a: node(f"float({a[0]})", lambda e, a=a[1]: _f(a(e)))),
        fn1("tanh", torch.tanh), fn1("sigmoid", lambda x: 1 / (1 + torch.exp(-x))),
        fn1("abs", torch.abs), fn1("floor", torch.floor), fn1("ceil", torch.ceil),
        fn1("sign", torch.sign),
        F.map(lambda a: node(f"exp(clamp({a[0]}, -10.0, 10.0))",
                             lambda e, a=a[1]: torch.exp(torch.clamp(_f(a(e)), -10.0, 10.0)))),
        F.map(lambda a: node(f"exp2(clamp({a[0]}, -10, 10))",
                             lambda e, a=a[1]: 2.0 ** torch.clamp(_f(a(e)), -10.0, 10.0))),
        F.map(lambda a: node(f"log(abs({a[0]}) + 1.0)", lambda e, a=a[1]: torch.log(torch.abs(_f(a(e))) + 1.0))),
        F.map(lambda a: node(f"log2(abs({a[0]}) + 0.5)",
                             lambda e, a=a[1]: torch.log(torch.abs(_f(a(e))) + 0.5) / math.log(2))),
        F.map(lambda a: node(f"sqrt(abs({a[0]}))", lambda e, a=a[1]: torch.sqrt(torch.abs(_f(a(e)))))),
        st.tuples(F, num).map(lambda t: node(f"min({t[0][0]}, {t[1][0][0]})",
                                             lambda e, a=t[0][1], b=t[1][0][1]: torch.minimum(_f(a(e)), _f(b(e))))),
        st.tuples(num, F).map(lambda t: node(f"max({t[0][0][0]}, {t[1][0]})",
                                             lambda e, a=t[0][0][1], b=t[1][1]: torch.maximum(_f(a(e)), _f(b(e))))),
        st.tuples(Bo, F, num).map(lambda t: node(f"where({t[0][0]}, {t[1][0]}, {t[2][0][0]})",
                                                 lambda e, c=t[0][1], a=t[1][1], b=t[2][0][1]:
                                                 torch.where(c(e), _f(a(e)), _f(b(e))))),
    )


_CMP = {"<": torch.lt, "<=": torch.le, ">": torch.gt, ">=": torch.ge, "==": torch.eq, "!=": torch.ne}


def _bool_nodes(I, F, Bo):
    num = st.one_of(I, F)
    ops = st.sampled_from(sorted(_CMP))

    def promote(x, y):
        if x.is_floating_point() or y.is_floating_point():
            return _f(x), _f(y)
        return x, y

    def cmp(a, op, b):
        return _CMP[op](*promote(a, b))
    return st.one_of(
        st.tuples(num, ops, num).map(lambda t: node(f"({t[0][0]} {t[1]} {t[2][0]})",
                                                    lambda e, a=t[0][1], op=t[1], b=t[2][1]: cmp(a(e), op, b(e)))),
        st.tuples(num, ops, num, ops, num).map(
            lambda t: node(f"({t[0][0]} {t[1]} {t[2][0]} {t[3]} {t[4][0]})",
                           lambda e, a=t[0][1], o1=t[1], b=t[2][1], o2=t[3], c=t[4][1]:
                           cmp(a(e), o1, b(e)) & cmp(b(e), o2, c(e)))),
        st.tuples(Bo, st.sampled_from(["&", "and"]), Bo).map(
            lambda t: node(f"({t[0][0]} {t[1]} {t[2][0]})", lambda e, a=t[0][1], b=t[2][1]: a(e) & b(e))),
        st.tuples(Bo, st.sampled_from(["|", "or"]), Bo).map(
            lambda t: node(f"({t[0][0]} {t[1]} {t[2][0]})", lambda e, a=t[0][1], b=t[2][1]: a(e) | b(e))),
        st.tuples(st.sampled_from(["~", "not "]), Bo).map(
            lambda t: node(f"({t[0]}{t[1][0]})", lambda e, a=t[1][1]: ~a(e))),
        st.tuples(Bo, st.sampled_from(["==", "!="]), Bo).map(
            lambda t: node(f"({t[0][0]} {t[1]} {t[2][0]})",
                           lambda e, a=t[0][1], op=t[1], b=t[2][1]: _CMP[op](a(e), b(e)))),
        st.tuples(Bo, Bo, Bo).map(lambda t: node(f"where({t[0][0]}, {t[1][0]}, {t[2][0]})",
                                                 lambda e, c=t[0][1], a=t[1][1], b=t[2][1]:
                                                 torch.where(c(e), a(e), b(e)))),
    )


def _levels(depth):
    I, F, Bo = _int_leaf(), _float_leaf(), _bool_leaf()
    for _ in range(depth):
        I, F, Bo = (st.one_of(I, _int_nodes(I, F, Bo)), st.one_of(F, _float_nodes(I, F, Bo)),
                    st.one_of(Bo, _bool_nodes(I, F, Bo)))
    return I, F, Bo


INTS, FLOATS, BOOLS = _levels(3)


def _mask_levels(depth):
    """Bool expressions for the mask: the same grammar without `score`."""
    def int_leaf():
        return st.one_of(
            st.sampled_from(INT_NAMES).map(lambda n: node(n, lambda e, n=n: e[n])),
            st.integers(-5, 20).map(lambda c: node(f"({c})", lambda e, c=c: _i(c))),
            st.just(node("ti[kv_idx]", lambda e: e["ti"][e["kv_idx"]])))

    def float_leaf():
        return st.one_of(
            st.sampled_from(FLOAT_CONSTS).map(lambda c: node(f"({c!r})", lambda e, c=c: _f(c))),
            st.just(node("tf[clamp(q_idx - kv_idx, 0, 3)]",
                         lambda e: e["tf"][torch.clamp(e["q_idx"] - e["kv_idx"], 0, 3)])))
    I, F, Bo = int_leaf(), float_leaf(), _bool_leaf()
    for _ in range(depth):
        I, F, Bo = (st.one_of(I, _int_nodes(I, F, Bo)), st.one_of(F, _float_nodes(I, F, Bo)),
                    st.one_of(Bo, _bool_nodes(I, F, Bo)))
    return Bo


MASKS = _mask_levels(2)
SCORES = st.one_of(FLOATS, INTS.map(lambda x: node(f"float({x[0]})", lambda e, a=x[1]: _f(a(e)))))


def env_for(q, k, sq, skv, seed):
    g = torch.Generator().manual_seed(seed)
    group = HQ // HKV
    s = torch.matmul(q, k.repeat_interleave(group, dim=1).transpose(-1, -2)) * (1 / math.sqrt(D))
    return {
        "score": s,
        "b": torch.arange(B).view(B, 1, 1, 1), "h": torch.arange(HQ).view(1, HQ, 1, 1),
        "q_idx": torch.arange(sq).view(1, 1, sq, 1), "kv_idx": torch.arange(skv).view(1, 1, 1, skv),
        "q_len": torch.tensor(sq), "kv_len": torch.tensor(skv),
        "tf": torch.randn(HQ, generator=g, dtype=torch.float64),
        "ti": torch.randint(-3, 9, (skv,), generator=g),
        "tb": torch.rand(sq, generator=g) > 0.3,
    }


def dense_attention(scores, allowed, v):
    group = HQ // HKV
    vv = v.repeat_interleave(group, dim=1)
    s3 = torch.where(allowed, scores, torch.tensor(-math.inf, dtype=torch.float64))
    lse = torch.logsumexp(s3, dim=-1)
    empty = ~allowed.any(dim=-1) | (lse == -math.inf)
    lse_safe = torch.where(empty, 0.0, lse)
    out = torch.exp(s3 - lse_safe[..., None]) @ vv
    return out, torch.where(empty, -math.inf, lse)


# ----- (a) print / parse round trip -----

@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(SCORES, MASKS))
def test_round_trip_of_generated_expressions(expr):
    tree = parse(expr[0])
    text = to_source(tree)
    assert parse(text) == tree, (expr[0], text)
    assert to_source(parse(text)) == text


# ----- (b) eager == dense float64 from the independent interpreter -----

@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.filter_too_much])
@given(SCORES, MASKS, st.sampled_from([(7, 11), (11, 7), (1, 5), (6, 1)]), st.integers(0, 3))
def test_eager_equals_dense_float64(score, mask, lengths, seed):
    sq, skv = lengths
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, sq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, HKV, skv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, HKV, skv, D, generator=g, dtype=torch.float64)
    env = env_for(q, k, sq, skv, seed)
    shape = (B, HQ, sq, skv)
    want_s = torch.broadcast_to(_f(score[1](env)), shape)
    allowed = torch.broadcast_to(mask[1](env), shape)
    assert allowed.dtype == torch.bool

    var = al.compile(score[0], mask[0])
    tensors = {n: env[n] for n in ("tf", "ti", "tb") if f"{n}[" in score[0] + mask[0]}
    bad = (torch.isnan(want_s) | (want_s == math.inf)) & allowed
    if bad.any():
        with pytest.raises(al.AttnLangError, match="allowed position"):
            var(q, k, v, backend="eager", return_lse=True, **tensors)
        return
    out, lse = var(q, k, v, backend="eager", return_lse=True, **tensors)
    want_out, want_lse = dense_attention(want_s, allowed, v)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, want_out, rtol=1e-7, atol=1e-7, msg=lambda m: f"{score[0]!r} {mask[0]!r}\n{m}")
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    fin = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[fin].double(), want_lse[fin], rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.filter_too_much])
@given(SCORES, MASKS, st.sampled_from([(7, 11), (1, 5)]), st.integers(0, 3))
def test_eager_gradients_equal_dense_float64(score, mask, lengths, seed):
    sq, skv = lengths
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, s, D, generator=g, dtype=torch.float64).requires_grad_(True)
               for h, s in ((HQ, sq), (HKV, skv), (HKV, skv)))
    env = env_for(q, k, sq, skv, seed)
    env["tf"].requires_grad_(True)
    shape = (B, HQ, sq, skv)
    want_s = torch.broadcast_to(_f(score[1](env)), shape)
    allowed = torch.broadcast_to(mask[1](env), shape)
    assume(not ((torch.isnan(want_s) | (want_s == math.inf)) & allowed).any())
    want_out, want_lse = dense_attention(want_s, allowed, v)
    finite = torch.isfinite(want_lse)
    inputs = (q, k, v, env["tf"])
    d_out = torch.randn(want_out.shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad((want_out * d_out).sum() + torch.where(finite, want_lse, 0.0).sum(), inputs,
                               allow_unused=True)
    want = [torch.zeros_like(t) if w is None else w for w, t in zip(want, inputs)]
    assume(all(torch.isfinite(w).all() for w in want))  # the hand-written reference can NaN where attnlang does not

    var = al.compile(score[0], mask[0])
    tensors = {n: env[n] for n in ("tf", "ti", "tb") if f"{n}[" in score[0] + mask[0]}
    out, lse = var(q, k, v, backend="eager", return_lse=True, **tensors)
    got = torch.autograd.grad((out * d_out).sum() + torch.where(finite, lse.double(), 0.0).sum(), inputs,
                              allow_unused=True)
    got = [torch.zeros_like(t) if x is None else x for x, t in zip(got, inputs)]
    for name, x, w in zip("q k v tf".split(), got, want):
        assert torch.isfinite(x).all(), name
        # lse comes back in float32, so its share of the gradient is float32-accurate
        torch.testing.assert_close(x, w, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"d{name}: {score[0]!r} {mask[0]!r}\n{m}")


# ----- (c) eager and flex (CPU) == dense float64, many variants in one process -----

def _comparison_twins():
    """Two masks ``a OP1 b`` and ``a OP2 b`` with the same operands: variants whose generated code differs in one
    comparison only, the shape of the cross-variant cache collision of issue 19 (``kv_idx < pre[0]`` then
    ``kv_idx >= pre[0]`` gave the first one's kernel)."""
    I, F = _mask_int_float()
    num = st.one_of(I, F)
    ops = st.sampled_from(sorted(_CMP))

    def build(t):
        a, o1, o2, b = t
        return [node(f"({a[0]} {o} {b[0]})", lambda e, a=a[1], o=o, b=b[1]: _bool_nodes_cmp(a(e), o, b(e)))
                for o in (o1, o2)]
    return st.tuples(num, ops, ops, num).filter(lambda t: t[1] != t[2]).map(build)


def _bool_nodes_cmp(x, op, y):
    if x.is_floating_point() or y.is_floating_point():
        x, y = _f(x), _f(y)
    return _CMP[op](x, y)


def _mask_int_float():
    I = st.one_of(st.sampled_from(["q_idx", "kv_idx", "h"]).map(lambda n: node(n, lambda e, n=n: e[n])),
                  st.integers(-2, 9).map(lambda c: node(f"({c})", lambda e, c=c: _i(c))),
                  st.just(node("ti[kv_idx]", lambda e: e["ti"][e["kv_idx"]])),
                  st.just(node("ti[0]", lambda e: e["ti"][0])))
    F = st.one_of(st.sampled_from(FLOAT_CONSTS).map(lambda c: node(f"({c!r})", lambda e, c=c: _f(c))),
                  st.just(node("tf[1]", lambda e: e["tf"][1])),
                  st.just(node("tf[h]", lambda e: e["tf"][e["h"]])))
    return I, F


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.filter_too_much])
@given(SCORES, MASKS, _comparison_twins(), st.sampled_from([(7, 11), (1, 5), (6, 1)]), st.integers(0, 3))
def test_eager_and_flex_equal_dense_float64_in_one_process(score, mask, twins, lengths, seed):
    """Every generated variant runs on eager and on flex's CPU path in this one process, each against the
    independent interpreter: a cache keyed too loosely (one variant's kernel for another) shows as a mismatch."""
    sq, skv = lengths
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, sq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, HKV, skv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, HKV, skv, D, generator=g, dtype=torch.float64)
    env = env_for(q, k, sq, skv, seed)
    shape = (B, HQ, sq, skv)
    for sc, mk in [(score, mask), (score, twins[0]), (score, twins[1]), (node("score", lambda e: e["score"]),
                                                                          twins[0])]:
        want_s = torch.broadcast_to(_f(sc[1](env)), shape)
        allowed = torch.broadcast_to(mk[1](env), shape)
        var = al.compile(sc[0], mk[0])
        tensors = {n: env[n] for n in ("tf", "ti", "tb") if f"{n}[" in sc[0] + mk[0]}
        bad = bool(((torch.isnan(want_s) | (want_s == math.inf)) & allowed).any())
        want_out, want_lse = dense_attention(want_s, allowed, v)
        for backend in ("eager", "flex"):
            if bad:
                with pytest.raises(al.AttnLangError, match="allowed position"):
                    var(q, k, v, backend=backend, return_lse=True, **tensors)
                continue
            out, lse = var(q, k, v, backend=backend, return_lse=True, **tensors)
            msg = f"{backend}: {sc[0]!r} {mk[0]!r}"
            torch.testing.assert_close(out, want_out, rtol=1e-7, atol=1e-7, msg=lambda m, msg=msg: f"{msg}\n{m}")
            assert torch.equal(torch.isinf(lse), torch.isinf(want_lse)), msg
            fin = torch.isfinite(want_lse)
            torch.testing.assert_close(lse[fin].double(), want_lse[fin], rtol=1e-5, atol=1e-5)


# ----- (d) bindings, bounded reductions, bit operations and erf / cos / sin (LANGUAGE.md's later section) -----
# The same interpreter, extended: a binding is evaluated once into the environment under its name, a reduction is
# the Python loop over its range, bit operations are Python's on int64 (<< as a product by 2 ** s, >> floor).

def _leaf(name):
    return node(name, lambda e, n=name: e[n])


def _bit_nodes(I):
    small = I.map(lambda a: (f"clamp({a[0]}, -1000, 1000)", lambda e, a=a[1]: torch.clamp(_i(a(e)), -1000, 1000)))
    return st.one_of(
        st.tuples(I, I).map(lambda t: node(f"({t[0][0]} & {t[1][0]})",
                                           lambda e, a=t[0][1], b=t[1][1]: torch.bitwise_and(_i(a(e)), _i(b(e))))),
        st.tuples(I, I).map(lambda t: node(f"({t[0][0]} | {t[1][0]})",
                                           lambda e, a=t[0][1], b=t[1][1]: torch.bitwise_or(_i(a(e)), _i(b(e))))),
        st.tuples(I, I).map(lambda t: node(f"({t[0][0]} ^ {t[1][0]})",
                                           lambda e, a=t[0][1], b=t[1][1]: torch.bitwise_xor(_i(a(e)), _i(b(e))))),
        st.tuples(small, st.integers(0, 4)).map(lambda t: node(f"({t[0][0]} << {t[1]})",
                                                               lambda e, a=t[0][1], s=t[1]: a(e) * 2 ** s)),
        st.tuples(I, st.integers(0, 5)).map(lambda t: node(f"({t[0][0]} >> {t[1]})",
                                                           lambda e, a=t[0][1], s=t[1]:
                                                           _floordiv_int(_i(a(e)), 2 ** s))),
    )


def _trig_nodes(F):
    return st.one_of(*(F.map(lambda a, name=name, f=f: node(f"{name}({a[0]})", lambda e, a=a[1]: f(_f(a(e)))))
                       for name, f in (("erf", torch.special.erf), ("cos", torch.cos), ("sin", torch.sin))))


def _with_i(e, i):
    return {**e, "i": torch.tensor(i)}


def _reductions(I, F, Bo):
    """Reductions whose bodies read the generator variable `i` (I, F, Bo include it as a leaf)."""
    K = st.integers(1, 4)

    def red(func, body, combine, k0=0):
        return st.tuples(body, st.integers(k0, 4)).map(lambda t: node(
            f"{func}({t[0][0]} for i in range({t[1]}))",
            lambda e, a=t[0][1], k=t[1]: combine([a(_with_i(e, i)) for i in range(k)])))

    def total(xs, zero):
        out = zero
        for x in xs:
            out = out + x
        return out

    def fold(xs, f, empty):
        out = empty
        for x in xs:
            out = f(out, x)
        return out
    return (
        st.one_of(red("sum", I, lambda xs: total([_i(x) for x in xs], _i(0))),
                  st.tuples(I, K).map(lambda t: node(f"max({t[0][0]} for i in range({t[1]}))",
                                                     lambda e, a=t[0][1], k=t[1]: fold(
                                                         [_i(a(_with_i(e, i))) for i in range(1, k)],
                                                         torch.maximum, _i(a(_with_i(e, 0))))))),
        st.one_of(red("sum", F, lambda xs: total([_f(x) for x in xs], _f(0))),
                  st.tuples(F, K).map(lambda t: node(f"min({t[0][0]} for i in range({t[1]}))",
                                                     lambda e, a=t[0][1], k=t[1]: fold(
                                                         [_f(a(_with_i(e, i))) for i in range(1, k)],
                                                         torch.minimum, _f(a(_with_i(e, 0))))))),
        st.one_of(red("any", Bo, lambda xs: fold(xs, torch.logical_or, torch.tensor(False))),
                  red("all", Bo, lambda xs: fold(xs, torch.logical_and, torch.tensor(True)))),
    )


@functools.lru_cache(maxsize=None)
def _new_levels(depth, ints=(), floats=(), bools=(), score=True, reductions=True):
    """(int, float, bool) strategies over the old and the new constructs; ``ints`` / ``floats`` / ``bools``: bound
    names usable as leaves."""
    def leaves(extra_i):
        i = st.one_of(st.sampled_from(INT_NAMES).map(_leaf), st.integers(-5, 20).map(
            lambda c: node(f"({c})", lambda e, c=c: _i(c))), *(st.just(_leaf(n)) for n in (*ints, *extra_i)))
        f = st.one_of(st.sampled_from(FLOAT_CONSTS).map(lambda c: node(f"({c!r})", lambda e, c=c: _f(c))),
                      st.just(node("tf[h]", lambda e: e["tf"][e["h"]])),
                      *([st.just(_leaf("score"))] if score else []), *(st.just(_leaf(n)) for n in floats))
        b = st.one_of(_bool_leaf(), *(st.just(_leaf(n)) for n in bools))
        return i, f, b

    def grow(I, F, Bo, n, red):
        for _ in range(n):
            parts = (st.one_of(I, _int_nodes(I, F, Bo), _bit_nodes(I)), st.one_of(F, _float_nodes(I, F, Bo),
                                                                                  _trig_nodes(F)),
                     st.one_of(Bo, _bool_nodes(I, F, Bo)))
            if red is not None:
                parts = tuple(st.one_of(p, r) for p, r in zip(parts, red))
            I, F, Bo = parts
        return I, F, Bo
    red = _reductions(*grow(*leaves(("i",)), 1, None)) if reductions else None
    return grow(*leaves(()), depth, red)


def _programs(score: bool):
    """(text, closure) of a program: up to two bindings (an int, then a float or bool that may read it), a result."""
    I0, F0, B0 = _new_levels(1, score=score)

    @st.composite
    def program(draw):
        names, texts, fns = [], [], []
        ints, floats, bools = [], [], []
        for k in range(draw(st.integers(0, 2))):
            kind = draw(st.sampled_from(["int", "float", "bool"]))
            I, F, Bo = _new_levels(1, tuple(ints), tuple(floats), tuple(bools), score=score, reductions=False) \
                if names else (I0, F0, B0)
            val = draw({"int": I, "float": F, "bool": Bo}[kind])
            name = f"v{k}"
            {"int": ints, "float": floats, "bool": bools}[kind].append(name)
            names.append(name)
            texts.append(f"{name} = {val[0]}")
            fns.append(val[1])
        I, F, Bo = _new_levels(1, tuple(ints), tuple(floats), tuple(bools), score=score)
        result = draw(F if score else Bo) if draw(st.booleans()) or not score else \
            draw(I.map(lambda x: node(f"float({x[0]})", lambda e, a=x[1]: _f(a(e)))))
        sep = draw(st.sampled_from(["; ", "\n"]))

        def run(e, names=tuple(names), fns=tuple(fns), result=result[1]):
            e = dict(e)
            for n, f in zip(names, fns):
                e[n] = f(e)
            return result(e)
        return node(sep.join(texts + [result[0]]), run)
    return program()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.filter_too_much])
@given(_programs(score=True), _programs(score=False), st.sampled_from([(7, 11), (1, 5)]), st.integers(0, 3))
def test_new_constructs_eager_equals_dense_float64(score, mask, lengths, seed):
    sq, skv = lengths
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, sq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, HKV, skv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, HKV, skv, D, generator=g, dtype=torch.float64)
    env = env_for(q, k, sq, skv, seed)
    shape = (B, HQ, sq, skv)
    want_s = torch.broadcast_to(_f(score[1](env)), shape)
    allowed = torch.broadcast_to(mask[1](env), shape)
    tensors = {n: env[n] for n in ("tf", "ti", "tb") if f"{n}[" in score[0] + mask[0]}
    try:
        var = al.compile(score[0], mask[0])
    except al.AttnLangError as e:  # only the size limits may refuse a generated program
        assert "too large" in e.message or "nested too deeply" in e.message, (score[0], mask[0], str(e))
        return
    bad = (torch.isnan(want_s) | (want_s == math.inf)) & allowed
    try:
        out, lse = var(q, k, v, backend="eager", return_lse=True, **tensors)
    except al.AttnLangError as e:
        assert bad.any() or "outside 64 bits" in e.message or "can be 0" in e.message, (score[0], mask[0], str(e))
        return
    assert not bad.any(), (score[0], mask[0])
    want_out, want_lse = dense_attention(want_s, allowed, v)
    torch.testing.assert_close(out, want_out, rtol=1e-7, atol=1e-7, msg=lambda m: f"{score[0]!r} {mask[0]!r}\n{m}")
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    fin = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[fin].double(), want_lse[fin], rtol=1e-5, atol=1e-5)


# ----- (e) the words `and` / `or` are logic on bools only (LANGUAGE.md): any int operand is refused -----

@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.filter_too_much])
@given(st.data(), st.sampled_from(["and", "or"]), st.sampled_from(["left", "right", "both"]))
def test_words_refuse_int_operands(data, word, where):
    I, _, Bo = _new_levels(1, score=False)
    left = data.draw(I if where in ("left", "both") else Bo)
    right = data.draw(I if where in ("right", "both") else Bo)
    mask = f"({left[0]} {word} {right[0]}) == ({left[0]} {word} {right[0]})"
    q = torch.randn(B, HQ, 5, D, dtype=torch.float64)
    k = torch.randn(B, HKV, 7, D, dtype=torch.float64)
    env = env_for(q, k, 5, 7, 0)
    tensors = {n: env[n] for n in ("tf", "ti", "tb") if f"{n}[" in mask}
    with pytest.raises(al.AttnLangError) as info:  # at compile time, or when the int tensor `ti` is bound
        al.compile(mask=mask)(q, k, k, backend="eager", **tensors)
    assert f"'{word}' is logic on bools only" in info.value.message, (mask, str(info.value))
