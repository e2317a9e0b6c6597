"""The simplifier: every rule fires on a case of its own, and the case keeps the variant's output (evaluated
before and after on random inputs, special float values included); random expressions keep theirs too."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnlang as al
from attnlang.ast import Binary, Const, DType, Op, Var, names_used
from attnlang.check import Checked, bind, check
from attnlang.lower_torch import evaluate
from attnlang.printer import to_source
from attnlang.simplify import MAX_PASSES, RULES, Simplified, simplify, simplify_variant

pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")

B, H, SQ, SKV = 2, 3, 11, 13


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "slope": torch.rand(H, generator=g, dtype=torch.float64) - 0.5,
        "bias": torch.randn(H, SKV, generator=g, dtype=torch.float64),
        "doc": torch.randint(0, 3, (max(SQ, SKV),), generator=g),
        "ib": torch.randint(-5, 6, (max(SQ, SKV),), generator=g),
        "m": torch.rand(max(SQ, SKV), generator=g) < 0.5,
    }


def _grid(score):
    return {"b": torch.arange(B).view(-1, 1, 1, 1), "h": torch.arange(H).view(1, -1, 1, 1),
            "q_idx": torch.arange(SQ).view(1, 1, -1, 1), "kv_idx": torch.arange(SKV).view(1, 1, 1, -1),
            "q_len": torch.tensor(SQ), "kv_len": torch.tensor(SKV), "score": score}


def _scores(seed=0, special=True):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, H, SQ, SKV, generator=g, dtype=torch.float64) * 3
    if special:
        flat = s.view(-1)
        flat[::17] = math.inf
        flat[5::19] = -math.inf
        flat[7::23] = math.nan
        flat[11::29] = -0.0
    return s


def _eval(expr, tensors, score):
    used = names_used(expr)
    names = {n: t for n, t in _grid(score).items() if n in used}
    out = evaluate(expr, names, tensors, torch.float64, torch.device("cpu"))
    return out.expand(B, H, SQ, SKV) if out.dim() == 4 or out.dim() == 0 else out


def _bound(checked: Checked, tensors):
    dtypes = {n: al.variant.dtype_of_torch(t.dtype) for n, t in tensors.items() if n in checked.tensors}
    return bind(checked, dtypes)


def final_scores(score, mask, shift, tensors, s):
    """s'' of LANGUAGE.md (score where mask else -inf), plus the lse shift where one was dropped."""
    sc = _eval(score, tensors, s).to(torch.float64)
    if shift is not None:
        sc = sc + _eval(shift, tensors, s).to(torch.float64)
    allowed = _eval(mask, tensors, s).to(torch.bool).expand(B, H, SQ, SKV)
    return torch.where(allowed, sc.expand(B, H, SQ, SKV), torch.tensor(-math.inf, dtype=torch.float64)), allowed


def assert_same_output(score_src="score", mask_src="True", params=None, seeds=(0, 1), special=True):
    c = check(score_src, mask_src, params)
    simp = simplify_variant(c.score, c.mask)
    tensors = {n: t for n, t in _tensors().items() if n in c.tensors}
    orig = _bound(c, tensors)
    new = _bound(Checked(simp.score, simp.mask, c.tensors, c.sources), tensors)
    shift = None
    if simp.lse_shift is not None:
        shift = _bound(Checked(simp.lse_shift, simp.mask, c.tensors, c.sources), tensors).score
    # types are kept: the mask stays bool, a float score stays float
    assert new.mask.dtype is DType.BOOL
    assert new.score.dtype is orig.score.dtype or new.score.dtype is DType.FLOAT  # an int score is float(score)
    for seed in seeds:
        s = _scores(seed, special)
        a, ma = final_scores(orig.score, orig.mask, None, tensors, s)
        if shift is not None and not torch.isfinite(_eval(shift, tensors, s)).all():
            # a call whose dropped row term is not finite runs the unshifted score (Variant._finite_rows), so the
            # shifted form is never used for these values
            continue
        b, mb = final_scores(new.score, new.mask, shift, tensors, s)
        if "lift_mask" not in simp.trace:  # lifting moves the score's -inf into the mask: compare s'' only
            assert torch.equal(ma, mb), f"masks differ: {mask_src!r} -> {to_source(simp.mask)!r}"
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9, equal_nan=True,
                                   msg=lambda m: f"{score_src!r} -> {to_source(simp.score)!r}: {m}")
    return simp


# (score, mask, params, a rule that must fire)
CASES = [
    ("score", "q_idx >= 2 + 3", None, "fold_binary"),
    ("score", "q_idx >= -(-3) * 2", None, "fold_unary"),
    ("score", "~(kv_idx >= 3) | ~True", None, "fold_unary"),
    ("score * exp(0.5) + abs(-2.5) + min(1, 2.5)", "kv_idx < max(3, 4) + clamp(9, 0, 5)", None, "fold_call"),
    ("score", "q_idx + 0 >= kv_idx", None, "add_zero"),
    ("score - 0", "float(q_idx) - 0 >= float(kv_idx)", None, "sub_zero"),
    ("score", "0 - q_idx <= -kv_idx * ib[kv_idx]", None, "zero_sub"),
    ("score * 1 + slope[h] * kv_idx * 1", "ib[q_idx] * 1 >= 0", None, "mul_one"),
    ("score / 1.0", "True", None, "div_one"),
    ("score", "q_idx // 1 >= kv_idx", None, "floordiv_one"),
    ("score", "ib[q_idx] * 0 + q_idx * 0 + kv_idx >= 3", None, "mul_zero"),
    ("score", "ib[q_idx] % 1 + q_idx % 1 == 0 & kv_idx < 4", None, "mod_one"),
    ("score", "ib[q_idx] - ib[q_idx] + (q_idx * kv_idx - q_idx * kv_idx) == 0", None, "sub_self"),
    ("score", "(q_idx >> 0) + (kv_idx << 0) == ib[q_idx] << 0", None, "shift_zero"),
    ("score - -bias[h, kv_idx]", "True", None, "sub_neg"),
    ("score + -bias[h, kv_idx]", "True", None, "add_neg"),
    ("--score", "- -ib[kv_idx] > 0", None, "neg_neg"),
    ("score", "~~m[q_idx] | ~~(q_idx > kv_idx)", None, "not_not"),
    ("score", "~(q_idx < kv_idx) & ~(doc[q_idx] == doc[kv_idx]) & ~(w != 0.5)", {"w": 0.25}, "not_compare"),
    ("score", "m[kv_idx] & True | q_idx > kv_idx & True", None, "and_true"),
    ("score", "m[kv_idx] & False | q_idx > 3", None, "and_false"),
    ("score", "(m[kv_idx] | True) & q_idx > 3", None, "or_true"),
    ("score", "q_idx > 3 | False", None, "or_false"),
    ("score", "q_idx > 3 & q_idx > 3 | (m[q_idx] | m[q_idx])", None, "idempotent"),
    ("where(True, score, 0.0) + where(False, 1.0, score)", "where(True, m[q_idx], False)", None, "where_const"),
    ("where(q_idx > 3, score, score)", "True", None, "where_same"),
    ("where(~(score > 0.5), score, 2.0 * score)", "True", None, "where_not"),
    ("float(score)", "int(q_idx) >= kv_idx", None, "float_of_float"),
    ("score", "int(q_idx) >= kv_idx", None, "int_of_int"),
    ("min(score, score) + max(bias[h, kv_idx], bias[h, kv_idx])", "True", None, "minmax_self"),
    ("score * 2 + 1", "q_idx * 0.5 >= 1", None, "float_literal_operand"),
    ("max(score, 0) + clamp(score, -1, 1) + where(q_idx > 2, score, 1)", "True", None, "float_literal_arg"),
    ("score", "kv_idx <= q_idx", None, "affine_compare"),
    ("score", "0 <= q_idx - kv_idx < 5", None, "affine_compare"),
    ("score", "kv_idx <= q_idx + kv_len - q_len", None, "affine_compare"),
    ("score", "3 < ib[q_idx] & bias[h, kv_idx] > w", {"w": 0.25}, "orient_compare"),
    ("score", "q_idx >= kv_idx & m[q_idx] & q_idx >= kv_idx", None, "sort_logic"),
    ("where(q_idx >= kv_idx, score, -inf)", "True", None, "lift_mask"),
    ("where(doc[q_idx] != doc[kv_idx], -inf, score * 2.0)", "kv_idx < 9", None, "lift_mask"),
    ("score + slope[h] * (kv_idx - q_idx)", "q_idx >= kv_idx", None, "shift_invariance"),
    ("score + bias[h, kv_idx] - 2.0 * q_idx + slope[h]", "True", None, "shift_invariance"),
    ("score - q_idx * (kv_idx + 1.5)", "True", None, "shift_invariance"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[3] + ":" + c[1] for c in CASES])
def test_rule_case_keeps_output(case):
    score, mask, params, rule = case
    simp = assert_same_output(score, mask, params)
    assert rule in simp.trace, f"{rule} did not fire: {simp.trace}"


def test_minus_negative_zero_is_kept():
    """x - (-0.0) is x + 0.0, which is +0.0 where x is -0.0: dropping it turned the +inf of 1.0 / (score * 0.0 -
    -0.0) (score < 0) into -inf, so an error became -5.0 (found by differential fuzzing)."""
    simp = assert_same_output("score + max(1.0 / (score * 0.0 - -0.0), -5.0)")
    assert "sub_zero" not in simp.trace
    assert "sub_zero" in assert_same_output("score + max(1.0 / (score * 0.0 - 0.0), -5.0)").trace


def test_every_rule_has_a_case():
    fired = set()
    for score, mask, params, _ in CASES:
        c = check(score, mask, params)
        fired |= set(simplify_variant(c.score, c.mask).trace)
    names = {fn.__name__ for _, fn in RULES} | {"lift_mask", "shift_invariance"}
    assert names <= fired, f"rules without a firing case: {sorted(names - fired)}"


# ---- normal forms and equality ----

@pytest.mark.parametrize("a,b", [
    ("q_idx >= kv_idx", "kv_idx <= q_idx"),
    ("q_idx >= kv_idx", "q_idx - kv_idx >= 0"),
    ("q_idx >= kv_idx", "~(q_idx < kv_idx)"),
    ("q_idx > kv_idx", "q_idx >= kv_idx + 1"),
    ("0 <= q_idx - kv_idx < 1024", "q_idx - kv_idx < 1024 & kv_idx <= q_idx"),
    ("kv_idx <= q_idx + kv_len - q_len", "q_idx - kv_idx >= q_len - kv_len"),
    ("doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx", "kv_idx <= q_idx & doc[kv_idx] == doc[q_idx]"),
    ("kv_idx < 1024 | q_idx >= kv_idx", "q_idx >= kv_idx | 1024 > kv_idx"),
])
def test_equivalent_spellings_are_equal(a, b):
    assert al.compile(mask=a) == al.compile(mask=b)
    assert al.compile(mask=a).canonical == al.compile(mask=b).canonical


def test_alibi_shift():
    v = al.compile(score="score + slope[h] * (kv_idx - q_idx)", mask="q_idx >= kv_idx")
    s = v.simplified
    assert to_source(s.score) == "score + slope[h] * kv_idx"
    assert to_source(s.lse_shift) == "-(slope[h] * q_idx)"
    assert to_source(s.score_unshifted) == "score + slope[h] * kv_idx - slope[h] * q_idx" or \
        "q_idx" in to_source(s.score_unshifted)
    assert "shift_invariance" in s.trace


def test_no_shift_without_row_terms():
    s = al.compile(score="score * slope[h] + bias[h, kv_idx]").simplified
    assert s.lse_shift is None and s.score_unshifted is None


def test_types_are_kept():
    # an int plus a float zero is a float: not the int
    c = check("score", "q_idx + 0.0 >= kv_idx")
    m = simplify_variant(c.score, c.mask).mask
    assert any(isinstance(n, Binary) and n.op is Op.ADD for n in _walk(m))
    # float * 0 is not 0 (inf * 0 is NaN)
    c = check("score * 0", "True")
    assert to_source(simplify_variant(c.score, c.mask).score) == "score * 0.0"
    # an unknown-typed read times 1.0 could be an int turned float: kept
    c = check("score", "ib[q_idx] * 1.0 >= 3")
    assert "1.0" in to_source(simplify_variant(c.score, c.mask).mask)
    # where(True, 1, score): the int branch would change the type
    c = check("where(True, 1, score)", "True")
    assert simplify_variant(c.score, c.mask).score.dtype is DType.FLOAT


def _walk(e):
    from attnlang.ast import walk
    return list(walk(e))


@pytest.mark.parametrize("src", ["1 // 0", "1 % 0", "1.0 / 0.0", "0.0 / 0.0", "log(-1.0)", "sqrt(-1.0)",
                                 "exp(1000.0)", "2 ** 70", "(-8.0) ** 0.5"])
def test_never_folds_errors_nan_or_overflow(src):
    c = check(f"score + {src}", "True")
    s = simplify_variant(c.score, c.mask)
    assert not any(isinstance(n, Const) and isinstance(n.value, float) and math.isnan(n.value)
                   for n in _walk(s.score))
    assert any(isinstance(n, Binary) and n.op in (Op.FLOORDIV, Op.MOD, Op.TRUEDIV, Op.POW) or
               getattr(n, "func", None) in ("log", "sqrt", "exp") for n in _walk(s.score_unshifted or s.score))


@pytest.mark.parametrize("src,value", [("-7 // 2", -4), ("-7 % 2", 1), ("7 % -2", -1), ("int(-2.7)", -2),
                                       ("int(2.7)", 2), ("2 ** 10", 1024), ("7 / 2", 3.5), ("abs(-3)", 3),
                                       ("sign(-2.5)", -1.0), ("floor(-2.5)", -3.0), ("ceil(2.1)", 3.0)])
def test_fold_semantics(src, value):
    c = check("score", f"q_idx >= {src}")
    got = simplify(c.mask)
    assert isinstance(got.right, Const) and got.right.value == value and type(got.right.value) is type(value)


def test_trace_and_explain_text():
    v = al.compile(score="where(q_idx >= kv_idx, score, -inf)", mask="True")
    assert v.simplified.trace == ("lift_mask",)


def test_deep_expression_does_not_recurse():
    text = "q_idx" + " + 1" * 95 + " >= kv_idx"
    c = check("score", text)
    s = simplify_variant(c.score, c.mask)
    assert to_source(s.mask) == "q_idx >= kv_idx - 95"
    e = Var("q_idx", None, DType.INT)
    for _ in range(3000):
        e = Binary(Op.ADD, e, Const(1, DType.INT), None, DType.INT)
    out = simplify(Binary(Op.GE, e, Var("kv_idx", None, DType.INT), None, DType.BOOL))
    assert isinstance(out, Binary) and isinstance(out.right, Binary) and out.right.right.value == 3000


def test_loop_guard():
    assert MAX_PASSES >= 8


def test_simplified_has_score_unshifted_field():
    s = Simplified(Var("score"), Const(True, DType.BOOL))
    assert s.score_unshifted is None and s.lse_shift is None


def test_spans_are_kept():
    c = check("score", "kv_idx <= q_idx")
    assert simplify(c.mask).span == c.mask.span


# ---- random expressions ----

def _float_exprs():
    leaves = st.sampled_from(["score", "slope[h]", "bias[h, kv_idx]", "float(q_idx)", "float(kv_idx)", "0.0",
                              "-0.0", "1.0", "0.5", "inf", "-inf", "2", "0", "1", "float(ib[q_idx])"])
    return st.recursive(leaves, lambda s: st.one_of(
        st.tuples(s, st.sampled_from(["+", "-", "*"]), s).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(s, s).map(lambda t: f"({t[0]} / ({t[1]} + 3.5))"),
        s.map(lambda a: f"-({a})"),
        st.tuples(st.sampled_from(["tanh", "abs", "float"]), s).map(lambda t: f"{t[0]}({t[1]})"),
        st.tuples(st.sampled_from(["min", "max"]), s, s).map(lambda t: f"{t[0]}({t[1]}, {t[2]})"),
        st.tuples(_bool_exprs_leaf(), s, s).map(lambda t: f"where({t[0]}, {t[1]}, {t[2]})"),
    ), max_leaves=6)


def _int_exprs():
    leaves = st.sampled_from(["q_idx", "kv_idx", "h", "b", "q_len", "kv_len", "ib[q_idx]", "doc[kv_idx]", "0",
                              "1", "2", "-3", "5"])
    return st.recursive(leaves, lambda s: st.one_of(
        st.tuples(s, st.sampled_from(["+", "-", "*"]), s).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(s, st.sampled_from(["//", "%"]), st.sampled_from(["1", "3", "-2"])).map(
            lambda t: f"({t[0]} {t[1]} {t[2]})"),
        s.map(lambda a: f"-({a})"),
        st.tuples(st.sampled_from(["min", "max"]), s, s).map(lambda t: f"{t[0]}({t[1]}, {t[2]})"),
    ), max_leaves=5)


def _bool_exprs_leaf():
    cmp = st.sampled_from(["<", "<=", ">", ">=", "==", "!="])
    return st.tuples(_int_exprs(), cmp, _int_exprs()).map(lambda t: f"({t[0]} {t[1]} {t[2]})")


def _masks():
    leaf = st.one_of(_bool_exprs_leaf(), st.sampled_from(["True", "False", "m[q_idx]", "m[kv_idx]"]))
    return st.recursive(leaf, lambda s: st.one_of(
        st.tuples(s, st.sampled_from(["&", "|"]), s).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        s.map(lambda a: f"~({a})")), max_leaves=5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(score=_float_exprs(), mask=_masks(), lift=st.booleans())
def test_random_variants_keep_output(score, mask, lift):
    if lift:
        score = f"where(q_idx >= kv_idx, {score}, -inf)"
    try:
        check(score, mask)
    except al.AttnLangError:
        return
    assert_same_output(score, mask, seeds=(3,))


def test_end_to_end_shift_and_nonfinite_row_terms():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 9, 8, dtype=torch.float64)
    k = torch.randn(1, 2, 9, 8, dtype=torch.float64)
    val = torch.randn(1, 2, 9, 8, dtype=torch.float64)
    slope = torch.tensor([0.5, 0.25], dtype=torch.float64)
    i = torch.arange(9)
    s = q @ k.transpose(-1, -2) / math.sqrt(8)
    # ALiBi: the simplified variant drops -slope * q_idx and adds it back to lse
    v = al.compile(score="score + slope[h] * (kv_idx - q_idx)", mask="q_idx >= kv_idx")
    out, lse = v(q, k, val, slope=slope, return_lse=True, backend="eager")
    ref = (s + slope.view(1, 2, 1, 1) * (i.view(1, -1) - i.view(-1, 1))).masked_fill(i.view(-1, 1) < i.view(1, -1),
                                                                                     -math.inf)
    torch.testing.assert_close(out, torch.softmax(ref, -1) @ val)
    torch.testing.assert_close(lse, torch.logsumexp(ref, -1))  # float64 in, float64 lse
    # a -inf row term masks its rows: they must come out 0 with lse -inf, not be shifted away
    v = al.compile(score="score + where(q_idx < 3, -inf, 0.0)")
    assert v.simplified.lse_shift is not None
    out, lse = v(q, k, val, return_lse=True, backend="eager")
    assert torch.all(out[:, :, :3] == 0) and torch.all(lse[:, :, :3] == -math.inf)
    torch.testing.assert_close(out[:, :, 3:], (torch.softmax(s, -1) @ val)[:, :, 3:])
