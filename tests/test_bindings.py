"""Bindings, bounded reductions, integer bit operations and erf / cos / sin (LANGUAGE.md's later section): parsing,
checking with carets, meaning on the eager backend against Python, intervals and block sparsity sound for them."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlang as al
from attnlang.ast import Op
from attnlang.check import MAX_TERMS, check
from attnlang.intervals import Interval, bounds
from attnlang.parse import parse
from attnlang.printer import to_program, to_source


def assert_points_at(err, text, token, where=None):
    """The error names the line and column of the first ``token`` in ``text``, with a caret under it."""
    at = text.index(token)
    line = text[:at].count("\n") + 1
    column = at - (text.rfind("\n", 0, at) + 1) + 1
    assert (err.line, err.column) == (line, column), str(err)
    assert err.source == text
    caret = str(err).split("\n")[-1]
    assert caret.index("^") - 4 + 1 == column, str(err)
    if where is not None:
        assert err.where == where

# ----- parsing -----


@pytest.mark.parametrize("text", [
    "qb = q_idx // 4; kb = kv_idx // 4; qb == kb | qb > kb & q_idx < 9",
    "qb = q_idx // 4\nkb = kv_idx // 4\nqb == kb | qb > kb & q_idx < 9",
    "qb = q_idx // 4;\n\nkb = kv_idx // 4\r\n  qb == kb | qb > kb & q_idx < 9",
    "qb = (q_idx\n  // 4); kb = kv_idx // 4; qb == kb | qb > kb & q_idx < 9",
    "qb = q_idx //\n 4\nkb = kv_idx // 4\nqb == kb | qb > kb &\n q_idx < 9",
])
def test_bindings_end_with_a_semicolon_or_a_new_line(text):
    want = check(mask="q_idx // 4 == kv_idx // 4 | q_idx // 4 > kv_idx // 4 & q_idx < 9").mask
    assert check(mask=text).mask == want


@pytest.mark.parametrize("text, column", [("a = 1 b = 2; a > b", 7), ("a = q_idx a > 0", 11)])
def test_a_missing_separator_is_an_error_at_the_next_token(text, column):
    with pytest.raises(al.AttnLangError) as info:
        parse(text)
    assert info.value.column == column and "';'" in info.value.message


@pytest.mark.parametrize("text, tree", [
    # loosest first: | ; ^ ; & ; ~ ; comparisons ; << >> ; + -
    ("a | b ^ c", "a | (b ^ c)"),
    ("a ^ b & c", "a ^ (b & c)"),
    ("a & b == c", "a & (b == c)"),
    ("a << 1 < b", "(a << 1) < b"),
    ("a << b + 1", "a << (b + 1)"),
    ("a >> 1 >> 2", "(a >> 1) >> 2"),
    ("a ^ b ^ c", "(a ^ b) ^ c"),
])
def test_bit_operator_precedence(text, tree):
    assert parse(text) == parse(tree)


def test_generator_form_and_two_argument_max():
    assert type(parse("max(a, b)")).__name__ == "Call"
    r = parse("max(t[i] for i in range(K))")
    assert type(r).__name__ == "Reduce" and r.func == "max" and r.var == "i"
    assert al.compile("max(score, 0.0)") == al.compile("max(score, 0.0)")  # unchanged meaning


# ----- checking: errors point inside bindings -----

ERRORS = [
    # (mask, params, token, message word)
    ("q_idx = 3; True", None, "q_idx", "built-in"),
    ("w = 3; q_idx < w", {"w": 2}, "w", "parameter"),
    ("doc = 1; doc[q_idx] == doc", None, "doc", "tensor"),
    ("where = 1; q_idx < where", None, "where", "function"),
    ("any = 1; q_idx < any", None, "any", "function"),
    ("x = 1; x = 2; q_idx < x", None, "x = 2", "bound already"),
    ("x = 1; any(q_idx == i for x in range(3))", None, "x in", "bound already"),
    ("x = y + 1; y = 2; q_idx < x", None, "y + 1", "not bound here"),
    ("sum(i for i in range(3)) + i > q_idx", None, "i > q_idx", "not bound here"),
    ("x = kv_idx + wid; q_idx < x", None, "wid", "was not given"),
    ("x = score; q_idx < x", None, "score", "cannot be used in a mask"),
    # a bound value's type error as an operand: the caret under the name where it is used, the binding named
    ("x = q_idx > 0; x + 1 > 2", None, "x + 1", "'x' is bound to a bool at line 1, column 5"),
    ("x = q_idx // 2; x & (x > 1)", None, "x &", "'x' is bound to an int"),
    ("i = 1.5; doc[i] == doc[kv_idx]", None, "i]", "'i' is bound to a float"),
    ("x = (q_idx >\n 2) + 1; x > 0", None, "q_idx >", "expects a number"),  # inside the binding: caret there
    ("any(q_idx + i for i in range(3))", None, "q_idx + i", "needs a bool"),
    ("sum(q_idx > i for i in range(3)) > 0", None, "q_idx > i", "bool"),
    ("any(q_idx == i for i in range(n))", {"n": 2.5}, "n))", "int literal or an int parameter"),
    ("any(q_idx == i for i in range(q_len))", None, "q_len", "int literal or an int parameter"),
    (f"any(q_idx == i for i in range({MAX_TERMS + 1}))", None, str(MAX_TERMS + 1), "more than"),
    ("any(q_idx == i for i in range(-1))", None, "-1", "negative"),
    ("max(i for i in range(0)) > q_idx", None, "0", "empty range"),
    ("foo(q_idx == i for i in range(2))", None, "foo(", "does not take a generator"),
    ("sum(q_idx, kv_idx) > 0", None, "sum(", "takes a generator"),
    ("~q_idx", None, "~q_idx", "'~' of an int"),
    ("not q_idx", None, "not q_idx", "'not' are logical not, on bools only"),
    ("(q_idx & (kv_idx > 0)) == 1", None, "q_idx", "mixes an int and a bool"),
    ("(q_idx & 1.5) > 0", None, "1.5", "float"),
    ("q_idx & 1.5 > 0", None, "q_idx", "mixes an int and a bool"),  # & binds looser than >
    ("(q_idx ^ True) == 1", None, "True", "expects an int"),
    ("q_idx << 64 > 0", None, "64", "[0, 63]"),
    ("q_idx >> -1 > 0", None, "-1", "[0, 63]"),
    ("q_idx & kv_idx", None, "q_idx & kv_idx", "must be bool"),
    # the words `and` / `or` are logic on bools only (LANGUAGE.md: "Logic on bools: ... also the words"); only the
    # symbols `&` / `|` are bitwise on ints
    ("(q_idx and 3) == 1", None, "q_idx", "'and' is logic on bools only"),
    ("(True and kv_idx) == 1", None, "kv_idx", "'and' is logic on bools only"),
    ("(q_idx or 3) == 1", None, "q_idx", "'or' is logic on bools only"),
    ("q_idx >= kv_idx and (q_idx or kv_idx) > 0", None, "q_idx or", "'or' is logic on bools only"),
    ("a = q_idx // 2; (a and 1) == 1", None, "a and", "'and' is logic on bools only"),  # the bound name as written
    ("q_idx and kv_idx > 0", None, "q_idx and", "'and' is logic on bools only"),  # not "mixes an int and a bool"
    ("any((q_idx or i) == 1 for i in range(3))", None, "q_idx or", "'or' is logic on bools only"),
]


@pytest.mark.parametrize("mask, params, token, word", ERRORS)
def test_errors_point_at_the_token(mask, params, token, word):
    with pytest.raises(al.AttnLangError) as info:
        al.compile(mask=mask, params=params)
    assert word in info.value.message, str(info.value)
    assert_points_at(info.value, mask, token, where="mask")


@pytest.mark.parametrize("kw, where", [(dict(mask="x = q_idx * 1.5; x"), "mask"),
                                       (dict(score="x = q_idx > kv_idx; x"), "score")])
def test_a_result_that_is_a_bound_name_of_the_wrong_type_points_at_the_name(kw, where):
    with pytest.raises(al.AttnLangError) as info:
        al.compile(**kw)
    text = kw[where]
    assert (info.value.line, info.value.column) == (1, text.rindex("x") + 1), str(info.value)
    assert "'x' is bound to" in info.value.message and "column 5" in info.value.message


@pytest.mark.parametrize("kw, where, token, other", [
    (dict(score="score * x", mask="x = 2; q_idx > x"), "score", "x", "mask"),
    (dict(score="score * float(i)", mask="any(q_idx == i for i in range(2))"), "score", "i)", "mask"),
    (dict(score="x = 2.0; score * x", sink="x + 1.0"), "sink", "x", "score"),
])
def test_a_name_bound_in_another_expression_says_so(kw, where, token, other):
    # a binding is local to its expression; the use elsewhere was told "not bound here: a binding is visible after
    # it", as for a use before the binding
    with pytest.raises(al.AttnLangError, match=f"is bound in the {other} expression, not in this one") as info:
        al.compile(**kw)
    assert_points_at(info.value, kw[where], token, where=where)
    al.compile(score="x = 2.0; score * x", mask="x = 1; q_idx > x")  # each its own x


def test_words_and_or_stay_logical_on_bools():
    q = torch.randn(1, 1, 6, 4, dtype=torch.float64)
    for word, sym in (("and", "&"), ("or", "|")):
        a = al.compile(mask=f"q_idx >= kv_idx {word} kv_idx % 2 == 0")
        b = al.compile(mask=f"q_idx >= kv_idx {sym} kv_idx % 2 == 0")
        assert a == b
        torch.testing.assert_close(a(q, q, q, backend="eager"), b(q, q, q, backend="eager"), rtol=0, atol=0)
    # `&` / `|` on ints stay bitwise
    assert al.compile(mask="(q_idx & 3) == 1") != al.compile(mask="(q_idx | 3) == 1")


@pytest.mark.parametrize("word", ["and", "or"])
def test_words_on_an_int_tensor_are_refused_when_it_is_bound(word):
    # at compile time a tensor read's element type is unknown; the call that binds an int tensor refuses the word
    mask = f"doc[q_idx] {word} doc[kv_idx]"
    v = al.compile(mask=mask)
    q = torch.randn(1, 1, 5, 4)
    out = v(q, q, q, backend="eager", doc=torch.tensor([True, False, True, True, False]))
    assert out.shape == q.shape
    with pytest.raises(al.AttnLangError, match=f"'{word}' is logic on bools only") as info:
        v(q, q, q, backend="eager", doc=torch.arange(5))
    assert_points_at(info.value, mask, "doc[q_idx]", where="mask")
    # the symbol stays bitwise there: two int tensor reads are an int, typed when the tensor is bound (at compile
    # time `t & u` of two tensor reads is left open, so it may be compared with a number)
    sym = {"and": "&", "or": "|"}[word]
    v = al.compile(mask=f"(doc[q_idx] {sym} doc[kv_idx]) == 0")
    doc = torch.tensor([0, 1, 2, 4, 5])
    bits = (doc.view(-1, 1) & doc) if word == "and" else (doc.view(-1, 1) | doc)
    s = (q @ q.transpose(-1, -2) / 2).masked_fill(bits != 0, -math.inf)
    want = torch.softmax(s, -1).nan_to_num(0.0) @ q
    torch.testing.assert_close(v(q, q, q, backend="eager", doc=doc), want)
    with pytest.raises(al.AttnLangError, match="compares a bool with a number"):
        v(q, q, q, backend="eager", doc=doc > 0)


def test_errors_inside_a_later_line_of_bindings():
    mask = "qb = q_idx // 4\nkb = kv_idx // bad\nqb >= kb"
    with pytest.raises(al.AttnLangError) as info:
        al.compile(mask=mask)
    assert (info.value.line, info.value.column) == (2, 16)


@pytest.mark.parametrize("mask, says", [
    ("x = doc[q_idx + 100]; True", "index 0 of 'doc' \\(size 4\\) can take values in \\[100, 103\\]"),
    ("x = doc[q_idx + 100]\ny = x\nTrue", "index 0 of 'doc'"),       # used only by an unused binding
    ("x = 1 // 0; True", "integer division by a value that can be 0"),
    ("x = 1 << q_idx * 30; q_idx >= kv_idx", "shifts of 64-bit ints must lie in \\[0, 63\\]"),
    ("x = q_idx * 4611686018427387904; True", "outside 64 bits"),
])
def test_an_unused_binding_is_checked_as_a_used_one(mask, says):
    # its value was dropped with the expansion, so its reads and divisions went unchecked although the variant
    # required its tensors: x = doc[q_idx + 100] ran with a doc of size 4
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(al.AttnLangError, match=says):
        al.compile(mask=mask)(q, q, q, **({"doc": torch.arange(4)} if "doc" in mask else {}))
    assert al.compile(mask="x = doc[q_idx + 1]; y = kv_idx; True")(q, q, q, doc=torch.arange(5)).shape == q.shape


def test_an_error_in_a_crlf_source_shows_its_line_without_the_carriage_return():
    # the shown line kept the '\r' of a Windows line end: a terminal returned to the line's start there
    with pytest.raises(al.AttnLangError) as info:
        al.compile(mask="qb = q_idx // 4\r\nkb = kv_idx // bad\r\nqb >= kb")
    assert (info.value.line, info.value.column) == (2, 16) and "\r" not in str(info.value)
    assert str(info.value).endswith("    kb = kv_idx // bad\n                   ^^^")


@pytest.mark.parametrize("mask, says", [
    ("a = q_idx >= kv_idx;", "must be followed by the result"),
    ("a = q_idx >= kv_idx;\n  ", "must be followed by the result"),
    ("a = q_idx\nb = a +\nb > 0", "the last binding runs to the end"),  # the new line after '+' went on
])
def test_bindings_without_a_result_say_so(mask, says):
    with pytest.raises(al.AttnLangError, match=says) as info:
        al.compile(mask=mask)
    assert "^" in str(info.value)


def test_expansion_is_bounded_not_exponential():
    # every binding doubles the expanded size: refused quickly, with an error, instead of a hang
    mask = "a0 = q_idx\n" + "".join(f"a{i} = a{i - 1} + a{i - 1}\n" for i in range(1, 40)) + "a39 > kv_idx"
    with pytest.raises(al.AttnLangError, match="once its bindings and reductions are expanded"):
        al.compile(mask=mask)


def test_nested_reductions_are_refused_before_expanding(monkeypatch):
    """50 nested sums of range(2) expand to 2**50 terms: the budget runs out at the innermost first term (it
    stands for all the terms of every enclosing reduction), not after ~50000 terms built one by one, which took
    1-2 s on a loaded machine (found by front-end fuzzing)."""
    from attnlang import check as check_module
    combined = []
    real = check_module._combine
    monkeypatch.setattr(check_module, "_combine", lambda *a: combined.append(1) or real(*a))

    def nest(n):
        return "sum(" * n + "score" + "".join(f" for i{j} in range(2))" for j in range(n))
    with pytest.raises(al.AttnLangError, match="once its bindings and reductions are expanded"):
        al.compile(nest(50))
    assert len(combined) < 100
    al.compile(nest(13))  # 8192 terms: within the limit, as before
    with pytest.raises(al.AttnLangError, match="once its bindings and reductions are expanded"):
        al.compile(nest(14))
    al.compile("sum(sum(float(j) for j in range(i)) for i in range(100)) + score")  # later terms cost more


@pytest.mark.parametrize("mask, token, word", [
    # the index / divisor / shift amount is a bound name or a generator's variable: the caret goes under the read
    # or the operation (line 3), not under the bound value (line 1, which reads no tensor and divides nothing)
    ("a = q_idx\nb2 = kv_idx\nt[a] > 0 & b2 >= 0", "t[a]", "index 0 of 't' (size 3)"),
    ("a = kv_idx - 1\nb2 = q_idx\nb2 // a == 0", "b2 // a", "integer division by a value that can be 0"),
    ("a = kv_idx - 1\nb2 = q_idx\n(b2 << a) > 0", "b2 << a", "a shift by an amount"),
    ("any(t[i] == kv_idx for i in range(4))", "t[i]", "can take values in [3, 3]"),
    ("a = q_idx + 1\nb2 = t[a + 0]\nb2 > 0", "a + 0", "index 0 of 't'"),  # written in the read: stays there
])
def test_call_time_errors_point_at_the_use_of_a_bound_name(mask, token, word):
    q = torch.zeros(1, 1, 4, 4)
    with pytest.raises(al.AttnLangError) as info:
        al.compile(mask=mask)(q, q, q, backend="eager", **({"t": torch.arange(3)} if "t[" in mask else {}))
    assert word in info.value.message, str(info.value)
    assert_points_at(info.value, mask, token, where="mask")


def test_shift_amount_and_overflow_are_checked_at_call_time():
    q = torch.zeros(1, 1, 5, 4)
    v = al.compile(mask="(q_idx << (kv_idx - 2)) > 0")
    with pytest.raises(al.AttnLangError, match=r"\[0, 63\]") as info:
        v(q, q, q, backend="eager")
    assert_points_at(info.value, v.mask, "kv_idx - 2", where="mask")
    with pytest.raises(al.AttnLangError, match="outside 64 bits"):
        al.compile(mask="(q_idx << 62) > kv_idx")(q, q, q, backend="eager")
    al.compile(mask="(q_idx << 60) > kv_idx")(q, q, q, backend="eager")  # 4 << 60 fits


# ----- meaning -----

def _eager_mask(mask, sq=9, skv=11, params=None, **tensors):
    """The allowed pairs of a mask as the eager backend computes them (from lse: -inf where a row has none)."""
    v = al.compile(score="score", mask=mask, params=params)
    # one key per row decides: q of zeros makes every score 0, so out = mean of the allowed v rows
    q = torch.zeros(1, 1, sq, 4, dtype=torch.float64)
    k = torch.zeros(1, 1, skv, 4, dtype=torch.float64)
    allowed = torch.zeros(sq, skv, dtype=torch.bool)
    for j in range(skv):
        vv = torch.zeros(1, 1, skv, 4, dtype=torch.float64)
        vv[0, 0, j, 0] = 1.0
        out = v(q, k, vv, backend="eager", **tensors)
        allowed[:, j] = out[0, 0, :, 0] > 0
    return allowed


def _python_mask(fn, sq=9, skv=11):
    return torch.tensor([[bool(fn(i, j)) for j in range(skv)] for i in range(sq)])


@pytest.mark.parametrize("mask, fn", [
    ("((q_idx ^ kv_idx) & 3) == 1", lambda i, j: ((i ^ j) & 3) == 1),
    ("(q_idx | kv_idx) == q_idx", lambda i, j: (i | j) == i),
    ("(q_idx - 5 & kv_idx - 7) < -2", lambda i, j: ((i - 5) & (j - 7)) < -2),
    ("(q_idx - 5 | kv_idx - 7) > -3", lambda i, j: ((i - 5) | (j - 7)) > -3),
    ("(q_idx - 4 >> 1) == kv_idx - 6 >> 2", lambda i, j: ((i - 4) >> 1) == ((j - 6) >> 2)),
    ("kv_idx << 2 <= q_idx << 1", lambda i, j: (j << 2) <= (i << 1)),
    ("any(kv_idx == q_idx - 2 * i for i in range(3))", lambda i, j: any(j == i - 2 * t for t in range(3))),
    ("all(kv_idx != q_idx + i for i in range(K))", lambda i, j: all(j != i + t for t in range(2))),
    ("s = sum(i * i for i in range(4)); kv_idx * 2 < s - q_idx", lambda i, j: j * 2 < 14 - i),
    ("max(abs(q_idx - kv_idx - i) for i in range(3)) < 4",
     lambda i, j: max(abs(i - j - t) for t in range(3)) < 4),
    ("min((q_idx + i) % 5 for i in range(2)) == kv_idx % 3", lambda i, j: min((i + t) % 5 for t in range(2)) == j % 3),
])
def test_masks_mean_what_python_computes(mask, fn):
    assert torch.equal(_eager_mask(mask, params={"K": 2} if "K" in mask else None), _python_mask(fn))


def test_reductions_over_tensors_and_float_functions():
    g = torch.Generator().manual_seed(0)
    B, H, S, D, R = 1, 2, 6, 8, 4
    q, k, v = (torch.randn(B, H, S, D, generator=g, dtype=torch.float64) for _ in range(3))
    qr = torch.randn(B, H, S, R, generator=g, dtype=torch.float64)
    kr = torch.randn(B, S, R, generator=g, dtype=torch.float64)
    var = al.compile(score="r = sum(qr[b, h, q_idx, i] * kr[b, kv_idx, i] for i in range(R))\n"
                           "score + erf(r) + cos(r) * sin(score)", params={"R": R})
    out, lse = var(q, k, v, backend="eager", return_lse=True, qr=qr, kr=kr)
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    r = torch.einsum("bhqr,bkr->bhqk", qr, kr)
    s2 = s + torch.special.erf(r) + torch.cos(r) * torch.sin(s)
    torch.testing.assert_close(out, torch.softmax(s2, -1) @ v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s2, -1), rtol=1e-6, atol=1e-6)


def test_any_over_a_bool_tensor_and_an_int_tensor():
    t = torch.tensor([True, False, True])
    assert torch.equal(_eager_mask("any(t[i] & (q_idx >= kv_idx + i) for i in range(3))", t=t),
                       _python_mask(lambda i, j: any(bool(t[s]) and i >= j + s for s in range(3))))
    ti = torch.tensor([1, 0, 1])
    v = al.compile(mask="any(t[i] for i in range(3))")
    q = torch.zeros(1, 1, 3, 4)
    with pytest.raises(al.AttnLangError, match=r"each term of any\(\) / all\(\) expects a bool") as info:
        v(q, q, q, backend="eager", t=ti)  # the error names the reduction written, not an internal where()
    assert "where" not in info.value.message and (info.value.line, info.value.column) == (1, 5)
    # int tensors under & are bitwise: an int mask is an error at call time
    w = al.compile(mask="t[q_idx] & t[kv_idx]")
    with pytest.raises(al.AttnLangError, match="mask must be bool"):
        w(q, q, q, backend="eager", t=ti)
    w(q, q, q, backend="eager", t=t)


def test_sum_over_a_bool_tensor_names_sum_not_its_expansion():
    # at compile time a tensor read's type is open; the call that binds a bool tensor refuses sum() of it, naming
    # sum() as written (as a known bool term does), not the '+' it expands to
    v = al.compile(mask="sum(t[i] for i in range(3)) > kv_idx")
    q = torch.zeros(1, 1, 3, 4)
    with pytest.raises(al.AttnLangError, match=r"sum\(\) expects a number, but this is bool") as info:
        v(q, q, q, backend="eager", t=torch.tensor([True, False, True]))
    assert_points_at(info.value, v.mask, "t[i]", where="mask")
    with pytest.raises(al.AttnLangError, match=r"'\+' expects a number"):
        al.compile(mask="x = t[0]; x + 1 > 0")(q, q, q, backend="eager", t=torch.tensor([True, False, True]))
    v(q, q, q, backend="eager", t=torch.tensor([1, 0, 1]))


def test_a_binding_changes_nothing_but_the_text():
    a = al.compile(mask="d = q_idx - kv_idx; 0 <= d & d < w", params={"w": 4})
    b = al.compile(mask="0 <= q_idx - kv_idx < w", params={"w": 4})
    assert a == b and hash(a) == hash(b)
    assert a.to_config()["mask"] == "d = q_idx - kv_idx; 0 <= d & d < w"
    assert al.from_config(a.to_config()) == a


def test_explain_and_the_canonical_program_keep_bindings_readable():
    mask = "qb = q_idx // bs + 1\nkb = kv_idx // bs + 1\nqb * qb == kb * kb | qb > kb * 2 & qb * qb < n"
    v = al.compile(mask=mask, params={"bs": 4, "n": 10})
    text = v.explain()
    assert "qb = q_idx // bs + 1" in text  # as written
    prog = to_program(v.checked.mask)
    assert "= q_idx // 4 + 1;" in prog and "= kv_idx // 4 + 1;" in prog and prog.count("//") == 2
    assert check(mask=prog).mask == v.checked.mask  # the printed program means the same expression
    assert to_program(parse("q_idx >= kv_idx")) == to_source(parse("q_idx >= kv_idx"))
    # a binding name never takes a param's name
    assert "t1 =" not in to_program(v.checked.mask, avoid=("t1",))


# ----- intervals: sound for the new operations -----

def _typed(text):
    return check(mask=f"({text}) == 0").mask.left


INT_RANGE = st.tuples(st.integers(-70, 70), st.integers(0, 90)).map(lambda t: (t[0], t[0] + t[1]))


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["&", "|", "^", "<<", ">>"]), INT_RANGE, INT_RANGE, st.data())
def test_bit_operation_bounds_hold_every_value(op, xr, yr, data):
    if op in ("<<", ">>"):
        yr = (min(max(yr[0], 0), 63), min(max(yr[1], 0), 63))
        yr = (min(yr), max(yr))
    e = _typed(f"q_idx {op} kv_idx")
    assert e.op in (Op.BITAND, Op.BITOR, Op.XOR, Op.LSHIFT, Op.RSHIFT)
    r = bounds(e, {"q_idx": Interval(*xr), "kv_idx": Interval(*yr)})
    x = data.draw(st.integers(*xr))
    y = data.draw(st.integers(*yr))
    got = {"&": lambda: x & y, "|": lambda: x | y, "^": lambda: x ^ y, "<<": lambda: x << y,
           ">>": lambda: x >> y}[op]()
    assert r.lo <= got <= r.hi, (op, xr, yr, x, y, r)
    # and the block-sparsity engine's per-block bounds (the same rule rows, on tensors of block bounds)
    from attnlang.intervals import TENSOR, apply, ctx
    t = [torch.tensor([float(v)], dtype=torch.float64) for v in (*xr, *yr)]
    lo, hi, _ = apply(e.op, TENSOR, ctx(integer=True, device=True), [(t[0], t[1], False), (t[2], t[3], False)])
    lo, hi = (float(torch.as_tensor(b).reshape(-1)[0]) for b in (lo, hi))
    assert lo <= got <= hi, (op, xr, yr, x, y, lo, hi)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["cos", "sin", "erf"]), st.floats(-20, 20), st.floats(0, 8), st.floats(0, 1))
def test_cos_sin_erf_bounds_hold(f, lo, width, t):
    e = check(f"score + {f}(score)").score.right
    r = bounds(e, {"score": Interval(lo, lo + width)})
    x = lo + t * width
    assert r.lo <= getattr(math, f)(x) <= r.hi
    assert -1 <= r.lo and r.hi <= 1
    assert bounds(e, {"score": Interval(-math.inf, 0.0)}).hi == (1.0 if f != "erf" else 0.0) or f != "erf"


# ----- block sparsity: sound, and as exact as the terms for `any` of equalities -----

def _dense_kinds(allowed, bq, bk):
    sq, skv = allowed.shape
    nq, nk = -(-sq // bq), -(-skv // bk)
    kinds = torch.zeros(nq, nk, dtype=torch.int8)
    for i in range(nq):
        for j in range(nk):
            tile = allowed[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            kinds[i, j] = 2 if bool(tile.all()) else 1 if bool(tile.any()) else 0
    return kinds


def _allowed(mask, sq, skv, params=None, **tensors):
    c = check(mask=mask, params=params)
    from attnlang.check import bind, dtype_of_torch
    from attnlang.lower_torch import evaluate
    bound = bind(c, {n: dtype_of_torch(t.dtype) for n, t in tensors.items()})
    names = {"q_idx": torch.arange(sq).view(sq, 1), "kv_idx": torch.arange(skv).view(1, skv),
             "b": torch.tensor(0), "h": torch.tensor(0), "q_len": torch.tensor(sq), "kv_len": torch.tensor(skv)}
    return torch.broadcast_to(evaluate(bound.mask, names, tensors, torch.float64), (sq, skv))


SPARSE_MASKS = [
    "any(kv_idx == q_idx - 16 * i for i in range(4))",
    "any(q_idx // 8 == kv_idx // 8 + i for i in range(2)) | kv_idx < 4",
    "((q_idx ^ kv_idx) & 8) == 0",
    "(q_idx >> 3) == (kv_idx >> 3) | (q_idx & 7) == (kv_idx & 7)",
    "kv_idx << 1 <= q_idx",
    "d = q_idx - kv_idx; 0 <= d & d < 9 | all(kv_idx != i for i in range(3))",
    "cos(float(q_idx - kv_idx)) > 0.5",
]


@pytest.mark.parametrize("mask", SPARSE_MASKS)
@pytest.mark.parametrize("lengths, block", [((97, 130), (16, 16)), ((45, 67), (8, 32))])
def test_block_sparsity_is_sound(mask, lengths, block):
    sq, skv = lengths
    v = al.compile(mask=mask)
    allowed = _allowed(mask, sq, skv)
    want = _dense_kinds(allowed, *block)
    for refine in (False, True):
        got = v.block_sparsity(q_len=sq, kv_len=skv, block_size=block, refine=refine).kind[0, 0]
        assert not ((got == 0) & (want != 0)).any(), (mask, refine)   # empty holds nothing allowed
        assert not ((got == 2) & (want != 2)).any(), (mask, refine)   # full holds only allowed pairs
        if refine:
            assert torch.equal(got, want), mask


def test_any_of_equalities_is_as_exact_as_its_terms():
    sq, skv, block = 97, 130, (16, 16)
    terms = [f"kv_idx == q_idx - {16 * i}" for i in range(4)]
    v = al.compile(mask="any(kv_idx == q_idx - 16 * i for i in range(4))")
    by_hand = al.compile(mask=" | ".join(terms))
    assert v == by_hand
    got = v.block_sparsity(q_len=sq, kv_len=skv, block_size=block, refine=False).kind[0, 0]
    assert torch.equal(got, _dense_kinds(_allowed(by_hand.mask, sq, skv), *block))


def test_long_reductions_simplify_to_a_fixed_point():
    # long chains are rebuilt in halves, each half the tree of its own terms: simplifying again changes nothing
    # (a rebuild whose subtrees differ from their own rebuild never settles and ran all 64 passes)
    from attnlang.simplify import simplify
    for n in (33, 200, 1000):
        v = al.compile(mask=f"any(kv_idx == q_idx - 3 * i for i in range({n}))")
        assert simplify(v.simplified.mask) == v.simplified.mask
        trace = []
        simplify(v.simplified.mask, trace)
        assert trace == [], trace[:5]
