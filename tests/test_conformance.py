"""Conformance with LANGUAGE.md: spellings the language defines as the same meaning give one Variant (==, hash,
canonical form, config round trip), and evaluations match independent Python / float64 references."""

import math
import operator
import random

import pytest
import torch

import attnlang as al
from attnlang.lower_torch import evaluate, positions

CAUSAL = "q_idx >= kv_idx"


def _assert_same_results(x, y):
    """x and y give the same out and lse on eager and flex (float64, CPU)."""
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    for backend in ("eager", "flex"):
        ox, lx = x(q, q, q, backend=backend, return_lse=True)
        oy, ly = y(q, q, q, backend=backend, return_lse=True)
        torch.testing.assert_close(ox, oy)
        torch.testing.assert_close(lx, ly)


# ---------------------------------------------------------------------------------------------------------------
# int literals where a float is meant (LANGUAGE.md: int op float is float; the sink is a float expression)

@pytest.mark.parametrize("a, b", [
    ("0", "0.0"), ("-1", "-1.0"), ("1 + 2", "3.0"), ("h", "float(h)"), ("q_len // 2", "float(q_len // 2)"),
    ("h + 1", "float(h + 1)"), ("0.5 * h + 1", "0.5 * h + 1.0"), ("max(h, 0.5) + 1", "max(h, 0.5) + 1.0"),
])
def test_an_int_sink_is_the_same_variant_as_its_float_spelling(a, b):
    x, y = al.compile(mask=CAUSAL, sink=a), al.compile(mask=CAUSAL, sink=b)
    assert x == y and hash(x) == hash(y) and x.canonical == y.canonical
    assert al.from_config(x.to_config()) == y and al.from_config(y.to_config()) == x
    _assert_same_results(x, y)


@pytest.mark.parametrize("a, b", [
    ("q_idx", "float(q_idx)"), ("1", "1.0"), ("kv_idx // 2", "float(kv_idx // 2)"), ("max(h, 0)", "float(max(h, 0))"),
    ("kv_idx * 2 - q_idx", "float(kv_idx * 2 - q_idx)"),
])
def test_an_int_score_is_the_same_variant_as_its_float_spelling(a, b):
    # LANGUAGE.md: the score is a float, as the sink is; an int score expression is converted, so it is float(score)
    x, y = al.compile(score=a, mask=CAUSAL), al.compile(score=b, mask=CAUSAL)
    assert x == y and hash(x) == hash(y) and x.canonical == y.canonical
    assert al.from_config(x.to_config()) == y
    _assert_same_results(x, y)


@pytest.mark.parametrize("a, b", [
    ("score + 1", "score + 1.0"), ("score * 2", "score * 2.0"), ("score / 2", "score / 2.0"),
    ("max(score, 0)", "max(score, 0.0)"), ("clamp(score, -1, 1)", "clamp(score, -1.0, 1.0)"),
    ("where(q_idx > kv_idx, score, 0)", "where(q_idx > kv_idx, score, 0.0)"), ("score - 3 // 2", "score - 1.0"),
    ("2 * score + 1", "2.0 * score + 1.0"),
])
def test_an_int_literal_that_meets_a_float_score_is_the_float_literal(a, b):
    x, y = al.compile(score=a, mask=CAUSAL), al.compile(score=b, mask=CAUSAL)
    assert x == y and hash(x) == hash(y) and x.canonical == y.canonical


def test_int_literals_keep_their_meaning_where_no_float_meets_them():
    assert al.compile(mask="q_idx // 2 >= kv_idx") != al.compile(mask="q_idx // 2.0 >= kv_idx")
    # a tensor read's type is known only at call time: an int tensor would add exactly, a float one rounds
    assert al.compile(sink="sinks[h] + 1") != al.compile(sink="sinks[h] + 1.0")
    # an int exponent keeps its spelling
    assert al.compile(score="score ** 2").canonical[0] == "score ** 2"


def test_a_huge_int_literal_is_not_respelled_where_float64_would_round_it():
    big = (1 << 53) + 1
    assert str(big) in al.compile(score=f"score + {big}").canonical[2]


# ---------------------------------------------------------------------------------------------------------------
# hostile values in v

@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_nan_in_v_with_normalize_false_names_v_not_the_range(backend):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 8, 8) for _ in range(3))
    v[0, 0, 5, 0] = float("nan")
    variant = al.compile(mask="q_idx >= kv_idx & q_idx > 0", normalize=False)
    with pytest.raises(al.AttnLangError, match="v holds a NaN or an infinite value"):
        variant(q, k, v, backend=backend)
    # a numerator past the range is still reported as such
    with pytest.raises(al.AttnLangError, match="range"):
        al.compile(score="score + 100.0", normalize=False)(q, k, torch.randn(1, 1, 8, 8), backend=backend)


@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_nan_in_v_leaves_rows_without_keys_zero(backend):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 8, 8) for _ in range(3))
    v[0, 0, 5, 0] = float("nan")
    for sink in (None, "0.0"):
        out, lse = al.compile(mask="q_idx >= kv_idx & q_idx > 0 & q_idx < 6", sink=sink)(
            q, k, v, backend=backend, return_lse=True)
        assert torch.equal(out[0, 0, [0, 6, 7]], torch.zeros(3, 8))
        assert torch.isnan(out[0, 0, 5]).any()  # the row attending the NaN key



# ---------------------------------------------------------------------------------------------------------------
# precedence and integer / float semantics against Python (LANGUAGE.md's ladder; Python's // % signs)

S = 6
PRECEDENCE = [
 ("not q_idx > 2 & kv_idx > 2", lambda q, k: (not q > 2) and k > 2),
 ("~q_idx > 2 | kv_idx < 1", lambda q, k: (not q > 2) or k < 1),
 ("not q_idx > 2 or kv_idx > 3 and q_idx < 1", lambda q, k: (not q > 2) or (k > 3 and q < 1)),
 ("(-2 ** 2) == -4 & q_idx >= kv_idx", lambda q, k: q >= k),
 ("-q_idx ** 2 == -(q_idx * q_idx)", lambda q, k: True),
 ("2 ** 3 ** 2 == 512", lambda q, k: True),
 ("(8 // 2 // 2) == 2 & q_idx - kv_idx - 1 >= 0", lambda q, k: q - k - 1 >= 0),
 ("(1 << 2 + 1) == 8", lambda q, k: True),
 ("(q_idx & 1 + 1) == 2", lambda q, k: (q & 2) == 2),
 ("(6 | 1 ^ 3 & 5) == 6", lambda q, k: True),
 ("(q_idx | kv_idx ^ 3 & q_idx) == (q_idx | (kv_idx ^ (3 & q_idx)))", lambda q, k: True),
 ("(q_idx << 1 >> 1) == q_idx", lambda q, k: True),
 ("(q_idx - 3 >> 1) == (q_idx - 3) // 2", lambda q, k: True),
 ("(-7 // 2) == -4 & (-7 % 2) == 1 & (7 % -2) == -1 & (7 // -2) == -4", lambda q, k: True),
 ("((q_idx - 3) % 4) == (q_idx - 3) - 4 * ((q_idx - 3) // 4)", lambda q, k: True),
 ("(-7.5 // 2.0) == -4.0 & (-7.5 % 2.0) == 0.5 & (7.5 % -2.0) == -0.5", lambda q, k: True),
 ("int(-7.9) == -7 & int(7.9) == 7 & int(-0.5) == 0", lambda q, k: True),
 ("q_idx == kv_idx != 3", lambda q, k: q == k and k != 3),
 ("1 < q_idx + 1 <= kv_idx + 2 < 6", lambda q, k: 1 < q + 1 <= k + 2 < 6),
 ("q_idx > 1 and kv_idx > 1 or q_idx == 0", lambda q, k: (q > 1 and k > 1) or q == 0),
 ("q_idx > 1 & kv_idx > 1 | q_idx == 0 & kv_idx == 0", lambda q, k: (q > 1 and k > 1) or (q == 0 and k == 0)),
 ("(q_idx ^ -1) == -q_idx - 1", lambda q, k: True),
 ("abs(-9223372036854775807) > 0", lambda q, k: True),
 ("(3 - q_idx) * (3 - q_idx) ** 1 >= 0", lambda q, k: (3 - q) * (3 - q) >= 0),
 ("2.0 ** -1 == 0.5 & 0.5 ** 2 == 0.25 & (-8.0) ** 2 == 64.0", lambda q, k: True),
 ("(-8.0) ** (1.0 / 3.0) > 0.0", lambda q, k: False),   # NaN: comparisons False
 ("exp2(3.0) == 8.0 & log2(8.0) == 3.0", lambda q, k: True),
 ("1e-3 * 1000.0 == 1.0", lambda q, k: True),
 (".5 == 0.5 & 5. == 5.0 & 1e3 == 1000", lambda q, k: True),
]


def _masks(text):
    v = al.compile(mask=text)
    names = positions(1, 1, 0, S, S)
    return [evaluate(m, names, {}, torch.float32).expand(1, 1, S, S)[0, 0] for m in (v.checked.mask,
                                                                                     v.simplified.mask)]


@pytest.mark.parametrize("text, f", PRECEDENCE, ids=[c[0] for c in PRECEDENCE])
def test_precedence_and_semantics_match_python(text, f):
    want = torch.tensor([[bool(f(q, k)) for k in range(S)] for q in range(S)])
    checked, simplified = _masks(text)  # unsimplified (the run time) and simplified (folding, normal forms)
    assert torch.equal(checked, want) and torch.equal(simplified, want)


def _random_int_expr(rng, depth):
    """An int expression over shifted positions (negatives occur) as (attnlang text, Python function)."""
    if depth == 0 or rng.random() < 0.25:
        kind = rng.choice("qkc")
        if kind == "q":
            return "(q_idx - 4)", lambda q, k: q - 4
        if kind == "k":
            return "(kv_idx - 5)", lambda q, k: k - 5
        c = rng.randint(-9, 9)
        return f"({c})", lambda q, k, c=c: c
    op = rng.choice(["+", "-", "*", "//", "%", "&", "|", "^", "<<", ">>", "min", "max", "abs"])
    a, fa = _random_int_expr(rng, depth - 1)
    if op == "abs":
        return f"abs({a})", lambda q, k: abs(fa(q, k))
    b, fb = _random_int_expr(rng, depth - 1)
    if op in ("//", "%"):
        c = rng.choice([-7, -3, -2, 2, 3, 5])
        b, fb = f"({c})", lambda q, k, c=c: c
    if op in ("<<", ">>"):
        c = rng.randint(0, 5)
        b, fb = str(c), lambda q, k, c=c: c
    if op in ("min", "max"):
        g = min if op == "min" else max
        return f"{op}({a}, {b})", lambda q, k: g(fa(q, k), fb(q, k))
    py = {"+": operator.add, "-": operator.sub, "*": operator.mul, "//": operator.floordiv, "%": operator.mod,
          "&": operator.and_, "|": operator.or_, "^": operator.xor, "<<": operator.lshift, ">>": operator.rshift}[op]
    return f"({a} {op} {b})", lambda q, k: py(fa(q, k), fb(q, k))


def test_random_int_expressions_match_python():
    rng = random.Random(0)
    for _ in range(120):
        (a, fa), (b, fb) = _random_int_expr(rng, 3), _random_int_expr(rng, 2)
        op = rng.choice(["<", "<=", "==", "!=", ">", ">="])
        text = f"{a} {op} {b}"
        cmp = {"<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt,
               ">=": operator.ge}[op]
        want = torch.tensor([[cmp(fa(q, k), fb(q, k)) for k in range(S)] for q in range(S)])
        checked, simplified = _masks(text)
        assert torch.equal(checked, want), text
        assert torch.equal(simplified, want), text


@pytest.mark.parametrize("score, named", [("sqrt(score)", "a square root of a negative"),
                                          ("log(score)", "a log of a negative"),
                                          ("log(score) + sqrt(score)", "a log or a square root of a negative")])
def test_a_nan_score_hint_names_the_function_the_score_takes(score, named):
    torch.manual_seed(0)
    q = torch.randn(1, 1, 4, 8)  # some scores negative
    with pytest.raises(al.AttnLangError, match=named):
        al.compile(score=score)(q, q, q, backend="eager")


# ---------------------------------------------------------------------------------------------------------------
# float values through the whole pipeline (check, simplify, backend) against Python's float64: a row with no
# allowed key has lse = sink (LANGUAGE.md), so a sink expression of q_idx reads out one value per row

def _py_sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


VALUES = [
    ("float(-7 // 2) + float(-7 % 2) * 10.0", lambda i: -4.0 + 10.0), ("float(7 % -3)", lambda i: -2.0),
    ("-7.0 % 2.0 + 7.0 % -2.5 * 10.0", lambda i: (-7.0 % 2.0) + (7.0 % -2.5) * 10.0),
    ("float(q_idx) % 1.5 - float(-q_idx) % 1.5", lambda i: i % 1.5 - (-i) % 1.5),
    ("float(q_idx - 1) // 0.7", lambda i: (i - 1) // 0.7), ("-7.0 // 2.0 + 7.5 // -2.0", lambda i: -4.0 - 4.0),
    ("float(int(-2.5)) + float(int(2.9)) * 10.0 + float(int(-0.9)) * 100.0", lambda i: -2.0 + 20.0),
    ("floor(-2.5) + ceil(-2.5) * 10.0", lambda i: -3.0 - 20.0), ("float(floor(q_idx - 1))", lambda i: i - 1.0),
    ("sign(-3.0) + sign(0.0) * 10.0 + float(sign(q_idx - 1)) * 100.0", lambda i: -1.0 + 100.0 * ((i > 1) - (i < 1))),
    ("float(abs(1 - q_idx)) + abs(-2.5)", lambda i: abs(1 - i) + 2.5),
    ("erf(0.5) + cos(1.0) * 10.0 + sin(1.0) * 100.0 + erf(float(q_idx))",
     lambda i: math.erf(0.5) + math.cos(1.0) * 10 + math.sin(1.0) * 100 + math.erf(i)),
    ("exp(1.0) + exp2(0.5) + log(2.0) + log2(3.0) + sqrt(2.0)",
     lambda i: math.e + 2 ** 0.5 + math.log(2) + math.log2(3) + math.sqrt(2)),
    ("tanh(0.3) + sigmoid(0.3) + sigmoid(-800.0)", lambda i: math.tanh(0.3) + _py_sigmoid(0.3)),
    ("float(min(3, q_idx)) + max(1, 2.5) + min(1, 2.5) * 10.0", lambda i: min(3, i) + 2.5 + 10.0),
    ("float(clamp(q_idx, 1, 1)) + clamp(5.0, 1.0, 3.0) * 10.0", lambda i: 1.0 + 30.0),
    ("where(q_idx > 0, 1.5, 2)", lambda i: 1.5 if i > 0 else 2.0),
    ("float(True) + float(q_idx > 0)", lambda i: 1.0 + (i > 0)),
    ("1 / 2 + float(7 / 2)", lambda i: 0.5 + 3.5),
    ("float(5 & 3) + float(5 | 3) * 10.0 + float(5 ^ 3) * 100.0 + float(-8 >> 1) * 1000.0",
     lambda i: 1.0 + 70.0 + 600.0 - 4000.0),
    ("float(1 << 62) / 4611686018427387904.0", lambda i: 1.0),
    ("float(9007199254740993) - 9007199254740992.0", lambda i: float(9007199254740993) - 9007199254740992.0),
    ("float(sum(i for i in range(5)))", lambda i: 10.0), ("sum(0.1 for i in range(10))", lambda i: sum([0.1] * 10)),
    ("float(sum(i * q_idx for i in range(K)))", lambda i: float(sum(j * i for j in range(4)))),
    ("max(float(i) - 1.5 for i in range(3))", lambda i: 0.5),
    ("float(min(q_idx - i for i in range(3)))", lambda i: i - 2.0),
    ("float(any(i == q_idx for i in range(2))) + float(all(i != q_idx for i in range(2))) * 10.0",
     lambda i: float(i < 2) + 10.0 * (i >= 2)),
    ("float(sum(0 for i in range(0))) + sum(0.0 for i in range(0))", lambda i: 0.0),
    ("float(any(True for i in range(0))) + float(all(False for i in range(0))) * 10.0", lambda i: 10.0),
    ("a = float(q_idx); c = a * 2.0; c + a", lambda i: 3.0 * i), ("float(~(q_idx > 0))", lambda i: float(not i > 0)),
    ("float(q_idx) ** 0.5 + 2.0 ** 3.0 ** 2.0 + float(-2 ** 2)", lambda i: i ** 0.5 + 512.0 - 4.0),
    ("-2.0 ** 0.5 + float(-9223372036854775807 - 1) / 9223372036854775808.0", lambda i: -(2 ** 0.5) - 1.0),
    ("float(int(1e18)) / 1e18 + float(10 // 3 * 3 + 10 % 3) + float(--q_idx)", lambda i: 1.0 + 10.0 + i),
    ("float(q_len + kv_len) + float(b + h)", lambda i: 3.0 + 4.0),
]


@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_values_through_the_pipeline_match_python_float64(backend):
    q, k = torch.zeros(1, 1, 3, 4, dtype=torch.float64), torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    for text, want in VALUES:
        variant = al.compile(mask="False", sink=text, params={"K": 4} if "range(K)" in text else {})
        out, lse = variant(q, k, k, backend=backend, return_lse=True)
        expected = torch.tensor([want(i) for i in range(3)], dtype=torch.float64)
        torch.testing.assert_close(lse[0, 0], expected, rtol=1e-12, atol=1e-12, msg=text)
        assert torch.equal(out, torch.zeros_like(out)), text


# ---------------------------------------------------------------------------------------------------------------
# LANGUAGE.md: out sums over the allowed keys only; a key of weight 0 adds nothing, whatever its row of v holds

def _plain_attention(q, k, v, allowed):
    """softmax over the allowed keys times v, summing only the allowed keys' rows (float64, one head)."""
    s = (q @ k.T) / math.sqrt(q.shape[-1])
    out = torch.zeros(q.shape[0], v.shape[-1], dtype=torch.float64)
    for i in range(q.shape[0]):
        keys = [j for j in range(k.shape[0]) if allowed(i, j)]
        w = torch.softmax(s[i, keys], dim=0)
        for wj, j in zip(w, keys):
            out[i] += wj * v[j]
    return out


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_v_row_of_a_key_no_row_attends_leaves_out_finite(bad):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64) for _ in range(3))
    v[0, :, 5] = bad            # the key beyond every row's window (a cache's unwritten tail)
    v[0, 1, 3, 2] = bad         # attended by rows 3, 4 of head 1 only
    variant = al.compile(mask="q_idx >= kv_idx & kv_idx < 5")
    out = variant(q, k, v, backend="eager")
    for h in range(2):
        want = _plain_attention(q[0, h], k[0, h], v[0, h], lambda i, j: i >= j and j < 5)
        torch.testing.assert_close(out[0, h], want, equal_nan=True)
    assert torch.isfinite(out[0, 0]).all() and torch.isfinite(out[0, 1, :3]).all()
    assert not torch.isfinite(out[0, 1, 3:5, 2]).any() and torch.isfinite(out[0, 1, 3:, [0, 1, 3]]).all()
    # normalize=False: a NaN only in the unattended tail is no error (the numerator is finite)
    v[0, 1, 3, 2] = 0.0
    num = al.compile(mask="q_idx >= kv_idx & kv_idx < 5", normalize=False)(q, k, v, backend="eager")
    assert torch.isfinite(num).all()


def test_a_non_finite_v_row_of_a_masked_key_keeps_gradients_finite():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bad = v.detach().clone()
    bad[0, :, 4] = float("nan")
    vb = bad.requires_grad_()
    out = al.compile(mask="kv_idx < 4", sink="0.0")(q, k, vb, backend="eager")
    out.sum().backward()
    ref = al.compile(mask="kv_idx < 4", sink="0.0")(q, k[:, :, :4], v[:, :, :4], backend="eager")
    torch.testing.assert_close(out, ref)
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and torch.isfinite(vb.grad).all()


@pytest.mark.parametrize("backend", ["eager", "flex"])
@pytest.mark.parametrize("score, shape", [("score + bias[h]", (0,)), ("score + bias[clamp(h, 0, 3)]", (0,)),
                                          ("score + bias[h, q_idx]", (2, 0))])
def test_reading_an_empty_tensor_says_it_is_empty_not_to_clamp(backend, score, shape):
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(al.AttnLangError, match="has size 0 along index") as e:
        al.compile(score=score)(q, q, q, backend=backend, bias=torch.zeros(shape))
    assert "clamp" not in str(e.value).splitlines()[0] and "^" in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# ints past 2**53 in the bounds analysis: bounds are exact Python ints, never rounded through float64

_BIG = 1 << 60


def test_int_floor_division_bounds_are_exact_past_2_53():
    # (2**60 - 1) / 2**60 rounds to 1.0 in float64, but (2**60 - 1) // 2**60 == 0: the index reaches -1, an error,
    # not a silent read of t[-1] (it was: the bounds said [0, 0])
    q = torch.zeros(1, 1, 2, 4, dtype=torch.float64)
    with pytest.raises(al.AttnLangError, match=r"can take values in \[-1, 0\]") as e:
        al.compile(f"score + t[(kv_idx + {_BIG - 1}) // {_BIG} - 1]")(q, q, q, backend="eager", t=torch.zeros(3))
    assert "^" in str(e.value)
    # -(2**63 - 1) // -1 == 2**63 - 1 fits in 64 bits (it was an overflow error: the float quotient is 2**63)
    out, lse = al.compile(mask="False", sink="float(-9223372036854775807 // -1) * 0.0")(
        q, q, q, backend="eager", return_lse=True)
    assert torch.equal(lse, torch.zeros_like(lse))


def test_int_tensor_value_bounds_are_exact_past_2_53():
    q = torch.zeros(1, 2, 2, 4, dtype=torch.float64)
    # x[h] - 2**60 is 1 for x = 2**60 + 1, outside t's one element (float(2**60 + 1) == 2**60: bounds said [0, 0],
    # and torch raised a bare IndexError)
    with pytest.raises(al.AttnLangError, match=r"can take values in \[1, 1\]") as e:
        al.compile(f"score + t[x[h] - {_BIG}]")(q, q, q, backend="eager", t=torch.zeros(1),
                                               x=torch.tensor([_BIG + 1, _BIG + 1]))
    assert "^" in str(e.value)
    # (0 + 2**60 - 1) // 2**60 - 1 == -1: an index error, not a silent read of t[-1]
    with pytest.raises(al.AttnLangError, match=r"can take values in \[-1, -1\]"):
        al.compile(f"score + t[(x[h] + {_BIG - 1}) // {_BIG} - 1]")(q, q, q, backend="eager", t=torch.zeros(3),
                                                                    x=torch.tensor([0, 0]))
    # int64's largest value minus 1 fits (float(2**63 - 1) is 2**63: it was an overflow error)
    _, lse = al.compile(mask="x[h] - 1 > 0")(q, q, q, backend="eager", return_lse=True,
                                             x=torch.tensor([2 ** 63 - 1, 1]))
    assert torch.isfinite(lse[0, 0]).all() and torch.isneginf(lse[0, 1]).all()


def test_int_of_a_float_has_exact_int_bounds():
    # int(1e18) is exactly 10**18; its bounds were the float 1e18, so 1e18 - (10**18 - 1) rounded to 0.0
    q = torch.zeros(1, 1, 2, 4, dtype=torch.float64)
    with pytest.raises(al.AttnLangError, match=r"can take values in \[1, 1\]") as e:  # was a bare IndexError
        al.compile("score + t[int(1e18) - 999999999999999999]")(q, q, q, backend="eager", t=torch.ones(1))
    assert "^" in str(e.value)
    # index 0: runs (was an index error: the bounds said -1)
    _, lse = al.compile("score + t[int(1e18) - 999999999999999999 - 1]")(q, q, q, backend="eager",
                                                                         return_lse=True, t=torch.ones(1))
    torch.testing.assert_close(lse, torch.full_like(lse, 1.0 + math.log(2.0)))


def test_int_of_a_float_past_2_24_covers_float32_rounding_in_the_index_check():
    # a float32 call computes f in float32: 2**25 + 3 becomes 2**25 + 4 (no float32 lies between), so the index
    # int(f[h]) - (2**25 - 4) is 8, outside t's 8 elements, though float64 says 7 (the lse's row term raised a bare
    # IndexError)
    f = torch.tensor([2.0 ** 25 + 3] * 2, dtype=torch.float64)
    t = torch.arange(8.0)
    score = f"score + t[int(f[h]) - {2 ** 25 - 4}]"
    q = torch.zeros(1, 2, 2, 4)
    for backend in ("eager", "flex"):
        with pytest.raises(al.AttnLangError, match="index 0 of 't'") as e:
            al.compile(score)(q, q, q, backend=backend, return_lse=True, t=t, f=f)
        assert "^" in str(e.value)
    # a float64 call computes it in float64: index 7, no error
    q = q.double()
    _, lse = al.compile(score)(q, q, q, backend="eager", return_lse=True, t=t, f=f)
    torch.testing.assert_close(lse, torch.full_like(lse, 7.0 + math.log(2.0)))


@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_int_of_float_arithmetic_covers_float32_landing_below_an_integer(backend):
    # 5.0 * 0.01 * 100.0 is 5.0 in float64 but 4.9999995 in float32, so int() gives 4 and the index -1: a float32
    # call read t[-1] silently (the checks widened only non-integer ends of the float's range)
    q = torch.zeros(1, 2, 2, 4)
    t = torch.tensor([10.0, 20.0, 30.0])
    for score, tensors in [("score + t[int(f[h] * 0.01 * 100.0) - 5]", {"f": torch.tensor([5.0, 5.0])}),
                           ("score + t[int(float(q_idx + 5) * 0.01 * 100.0) - 5]", {})]:
        with pytest.raises(al.AttnLangError, match="index 0 of 't'") as e:
            al.compile(score)(q, q, q, backend=backend, return_lse=True, t=t, **tensors)
        assert "^" in str(e.value)
    # a read converted as it is stays exact: t[int(f[h]) - 3] with f >= 3.0 is no error
    _, lse = al.compile("score + t[int(f[h]) - 3]")(q, q, q, backend=backend, return_lse=True, t=t,
                                                   f=torch.tensor([3.0, 5.0]))
    torch.testing.assert_close(lse[0, :, 0], torch.tensor([10.0, 30.0]) + math.log(2.0))


@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_int_of_constant_float_arithmetic_is_checked_as_the_simplifier_folds_it(backend):
    # a constant subexpression is folded in float64 before any kernel runs (int(5.0 * 0.01 * 100.0) is 5), so the
    # float32 widening of computed ends must not apply to it: t[int(5.0 * 0.01 * 100.0) - 5] reads t[0], no error
    q = torch.zeros(1, 2, 2, 4)
    t = torch.tensor([10.0, 20.0, 30.0])
    _, lse = al.compile("score + t[int(5.0 * 0.01 * 100.0) - 5]")(q, q, q, backend=backend, return_lse=True, t=t)
    torch.testing.assert_close(lse, torch.full_like(lse, 10.0 + math.log(2.0)))


@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_an_index_guarded_by_where_is_in_range_where_its_condition_holds(backend):
    # t[where(q_idx < 4, q_idx, 0)] never reads past t[3]: the index check bounds each branch's value under its
    # condition (it joined the branches' whole ranges and refused the call)
    q = torch.zeros(1, 2, 8, 4)
    t = torch.tensor([1.0, 2.0, 3.0, 4.0])
    _, lse = al.compile("score + t[where(q_idx < 4, q_idx, 0)]")(q, q, q, backend=backend, return_lse=True, t=t)
    want = torch.tensor([1.0, 2.0, 3.0, 4.0, 1.0, 1.0, 1.0, 1.0]) + math.log(8.0)
    torch.testing.assert_close(lse[0, 0], want)
