"""The grammar: LANGUAGE.md's precedence ladder, chained comparisons, literals, keywords, and syntax errors with
their line, column and caret."""

import functools
import math
import operator

import pytest
import torch

import attnlang as al
from attnlang.ast import Binary, Call, Const, DType, Index, Op, Unary, Var, depth
from attnlang.parse import MAX_DEPTH, parse


def V(name):
    return Var(name)


def I(value):
    return Const(value, DType.INT)


def F(value):
    return Const(float(value), DType.FLOAT)


def B(op, a, b):
    return Binary(op, a, b)


a, b_, c, d = V("a"), V("b"), V("c"), V("d")

# text -> the same expression with every group made explicit by parentheses
PRECEDENCE = [
    # | / or loosest, then & / and
    ("a | b & c", "a | (b & c)"),
    ("a & b | c", "(a & b) | c"),
    ("a or b and c", "a or (b and c)"),
    ("a and b or c", "(a and b) or c"),
    ("a | b | c", "(a | b) | c"),
    ("a & b & c", "(a & b) & c"),
    # ~ / not looser than comparisons, tighter than &
    ("~a & b", "(~a) & b"),
    ("not a and b", "(not a) and b"),
    ("~a == b", "~(a == b)"),
    ("not a < b", "not (a < b)"),
    ("~~a", "~(~a)"),
    ("not not a", "not (not a)"),
    # & and | are LOOSER than comparisons (unlike Python)
    ("q_idx >= kv_idx & q_idx - kv_idx < w", "(q_idx >= kv_idx) & ((q_idx - kv_idx) < w)"),
    ("a < b | c == d", "(a < b) | (c == d)"),
    ("a != b & c <= d", "(a != b) & (c <= d)"),
    # comparisons looser than + -
    ("a + b < c - d", "(a + b) < (c - d)"),
    ("a == b + c", "a == (b + c)"),
    # + - looser than * / // %
    ("a + b * c", "a + (b * c)"),
    ("a - b / c", "a - (b / c)"),
    ("a + b // c", "a + (b // c)"),
    ("a - b % c", "a - (b % c)"),
    ("a * b + c", "(a * b) + c"),
    # left associativity
    ("a - b - c", "(a - b) - c"),
    ("a + b - c", "(a + b) - c"),
    ("a / b / c", "(a / b) / c"),
    ("a // b % c", "(a // b) % c"),
    ("a % b * c", "(a % b) * c"),
    ("a * b / c // d", "((a * b) / c) // d"),
    # * / looser than unary -
    ("-a * b", "(-a) * b"),
    ("a * -b", "a * (-b)"),
    # unary - looser than **: -2 ** 2 == -(2 ** 2)
    ("-2 ** 2", "-(2 ** 2)"),
    ("-a ** b", "-(a ** b)"),
    ("--a", "-(-a)"),
    # ** right associative, tighter than unary - on its left, takes a unary on its right
    ("a ** b ** c", "a ** (b ** c)"),
    ("a ** -b", "a ** (-b)"),
    ("a ** -b ** c", "a ** (-(b ** c))"),
    ("a * b ** c", "a * (b ** c)"),
    # call and index tightest
    ("x[a] ** 2", "(x[a]) ** 2"),
    ("-x[a]", "-(x[a])"),
    ("-abs(a) ** 2", "-((abs(a)) ** 2)"),
    ("x[a + 1, b * 2]", "x[(a + 1), (b * 2)]"),
    # spacing and newlines are insignificant
    ("a+b*c", "a + (b * c)"),
    ("a\n+\tb", "a + b"),
]


@pytest.mark.parametrize("text, explicit", PRECEDENCE)
def test_precedence_ladder(text, explicit):
    assert parse(text) == parse(explicit)


def test_precedence_trees():
    assert parse("a | b & c") == B(Op.OR, a, B(Op.AND, b_, c))
    assert parse("~a == b") == Unary(Op.NOT, B(Op.EQ, a, b_))
    assert parse("-2 ** 2") == Unary(Op.NEG, B(Op.POW, I(2), I(2)))
    assert parse("(-2) ** 2") == B(Op.POW, I(-2), I(2))
    assert parse("a ** b ** c") == B(Op.POW, a, B(Op.POW, b_, c))
    assert parse("a - b - c") == B(Op.SUB, B(Op.SUB, a, b_), c)
    assert parse("q_idx >= kv_idx & q_idx - kv_idx < w") == B(
        Op.AND, B(Op.GE, V("q_idx"), V("kv_idx")), B(Op.LT, B(Op.SUB, V("q_idx"), V("kv_idx")), V("w")))


def test_keywords_equal_symbols():
    assert parse("a and b") == parse("a & b")
    assert parse("a or b") == parse("a | b")
    assert parse("not a") == parse("~a")
    assert parse("not a or b and not c") == parse("~a | b & ~c")


@pytest.mark.parametrize("name", ["info", "inference", "Trueish", "Falsey", "notable", "order", "android",
                                  "nota", "and_", "_or", "x1", "_"])
def test_keyword_prefixes_are_names(name):
    assert parse(name) == Var(name)


CHAINS = [
    ("0 <= q_idx - kv_idx < window",
     B(Op.AND, B(Op.LE, I(0), B(Op.SUB, V("q_idx"), V("kv_idx"))),
       B(Op.LT, B(Op.SUB, V("q_idx"), V("kv_idx")), V("window")))),
    ("a < b < c", B(Op.AND, B(Op.LT, a, b_), B(Op.LT, b_, c))),
    ("a == b != c", B(Op.AND, B(Op.EQ, a, b_), B(Op.NE, b_, c))),
    ("a < b <= c > d", B(Op.AND, B(Op.AND, B(Op.LT, a, b_), B(Op.LE, b_, c)), B(Op.GT, c, d))),
]


@pytest.mark.parametrize("text, tree", CHAINS)
def test_chained_comparisons(text, tree):
    assert parse(text) == tree


def test_parenthesised_comparison_is_not_a_chain():
    assert parse("(a < b) == c") == B(Op.EQ, B(Op.LT, a, b_), c)


LITERALS = [
    ("42", Const(42, DType.INT)),
    ("0", Const(0, DType.INT)),
    ("007", Const(7, DType.INT)),
    ("0.5", Const(0.5, DType.FLOAT)),
    (".5", Const(0.5, DType.FLOAT)),
    ("5.", Const(5.0, DType.FLOAT)),
    ("1e-3", Const(1e-3, DType.FLOAT)),
    ("1E3", Const(1000.0, DType.FLOAT)),
    ("2.5e+2", Const(250.0, DType.FLOAT)),
    ("inf", Const(math.inf, DType.FLOAT)),
    ("-inf", Const(-math.inf, DType.FLOAT)),
    ("True", Const(True, DType.BOOL)),
    ("False", Const(False, DType.BOOL)),
    ("-3", Const(-3, DType.INT)),
    ("-0.25", Const(-0.25, DType.FLOAT)),
]


@pytest.mark.parametrize("text, tree", LITERALS)
def test_literals(text, tree):
    got = parse(text)
    assert got == tree
    assert got.dtype is tree.dtype and type(got.value) is type(tree.value)


def test_literal_types_differ():
    assert parse("1") != parse("1.0")
    assert parse("1") != parse("True")
    assert parse("1.0") != parse("True")


def test_calls_and_indexes():
    assert parse("where(a, b, c)") == Call("where", (a, b_, c))
    assert parse("f()") == Call("f", ())
    assert parse("min(a, b,)") == Call("min", (a, b_))
    assert parse("rel[h, q_idx - kv_idx + 512]") == Index(
        "rel", (V("h"), B(Op.ADD, B(Op.SUB, V("q_idx"), V("kv_idx")), I(512))))
    assert parse("x[y[a]]") == Index("x", (Index("y", (a,)),))


def test_spans_are_one_based_and_not_compared():
    tree = parse("a +\n  bb")
    assert tree.span.line == 1 and tree.span.column == 1
    assert tree.right.span.line == 2 and tree.right.span.column == 3
    assert tree.right.span.end - tree.right.span.start == 2
    assert parse("a+bb") == tree


# text, line, column, a word of the message
SYNTAX_ERRORS = [
    ("q_idx >=", 1, 9, "end"),
    ("q_idx >= kv_idx)", 1, 16, "')'"),
    ("(q_idx", 1, 7, "end"),
    ("3 3", 1, 3, "'3'"),
    ("a $ b", 1, 3, "'$'"),
    ("x.y", 1, 2, "'.'"),
    ("a = b", 1, 3, "'='"),
    ("a <> b", 1, 4, "'>'"),
    ("x[]", 1, 3, "']'"),
    ("f(,)", 1, 3, "','"),
    ("a +* b", 1, 4, "'*'"),
    ("0x10", 1, 2, "x10"),
    ("q_idx >= kv_idx &\n  q_idx < * 3", 2, 11, "'*'"),
    ("a +\n\n", 3, 1, "end"),
    ("a\n+\n$", 3, 1, "'$'"),
    ("   ", 1, 1, "empty"),
    ("", 1, 1, "empty"),
]


def caret_column(err) -> int:
    """1-based column of the first caret in str(err) (the source line and caret are indented by 4)."""
    lines = str(err).split("\n")
    caret = lines[-1]
    assert set(caret.strip()) == {"^"}, str(err)
    return caret.index("^") - 4 + 1


@pytest.mark.parametrize("text, line, column, word", SYNTAX_ERRORS)
def test_syntax_errors(text, line, column, word):
    with pytest.raises(al.AttnLangError) as info:
        parse(text, where="mask")
    err = info.value
    assert (err.line, err.column) == (line, column), str(err)
    assert err.source == text
    assert word in err.message
    assert f"line {line}, column {column}" in str(err)
    assert caret_column(err) == column
    shown = str(err).split("\n")[-2]
    assert shown == "    " + text.split("\n")[line - 1]


def test_syntax_error_is_valueerror_and_raised_by_compile():
    with pytest.raises(ValueError):
        al.compile(mask="q_idx >=")
    with pytest.raises(al.AttnLangError) as info:
        al.compile(score="score +", mask="True")
    assert info.value.where == "score" and "score expression" in str(info.value)


def test_expected_tokens_name_keywords():
    with pytest.raises(al.AttnLangError) as info:
        parse("x[]")
    for word in ("'~'", "'('", "'not'", "'inf'", "'True'"):
        assert word in info.value.message


def test_too_deep_is_clean():
    text = "(" * (MAX_DEPTH + 50) + "a" + ")" * (MAX_DEPTH + 50)
    assert parse(text) == a  # parentheses add no depth
    deep = "-" * (MAX_DEPTH + 5) + "a"
    with pytest.raises(al.AttnLangError):
        parse(deep)


def test_not_a_string():
    with pytest.raises(al.AttnLangError):
        parse(42)


# ---------------------------------------------------------------------------------------------------------------
# long written chains of | & ^ (exactly associative) are regrouped rather than refused as nested too deeply

def test_a_long_chain_of_alternatives_is_regrouped_not_refused():
    n = MAX_DEPTH + 50
    text = " | ".join(f"kv_idx == {i}" for i in range(n))
    tree = parse(text)
    assert depth(tree) <= 12
    x = torch.randn(1, 1, n + 7, 4, dtype=torch.float64)
    got = al.compile(mask=text)(x, x, x, backend="eager")
    torch.testing.assert_close(got, al.compile(mask=f"kv_idx < {n}")(x, x, x, backend="eager"))
    # the same for a chained comparison's pairs and for the word `and`
    assert al.compile(mask="0 " + "<= q_idx " * n) == al.compile(mask="0 <= q_idx <= q_idx")
    words = al.compile(mask=" and ".join(f"kv_idx != {i}" for i in range(n)))
    want = al.compile(mask=f"kv_idx >= {n}")(x, x, x, backend="eager")
    torch.testing.assert_close(words(x, x, x, backend="eager"), want)


def test_a_long_xor_chain_keeps_its_value_and_short_chains_keep_their_shape():
    n = MAX_DEPTH + 20
    want = functools.reduce(operator.xor, (3 * i + 1 for i in range(n)))
    text = " ^ ".join(f"{3 * i + 1}" for i in range(n))
    assert al.compile(mask=f"({text}) == {want}").canonical[1] == "True"
    assert al.compile(mask=f"({text}) == {want + 1}").canonical[1] == "False"
    assert parse("a | b | c | d") == B(Op.OR, B(Op.OR, B(Op.OR, a, b_), c), d)   # accepted as written: unchanged


def test_a_long_chain_of_arithmetic_is_refused_with_a_hint():
    with pytest.raises(al.AttnLangError, match="a chain of n operators nests n levels: group it with parentheses"):
        parse(" + ".join(["score"] * (MAX_DEPTH + 5)))
    with pytest.raises(al.AttnLangError, match=r"nested too deeply \(\d+ levels; at most \d+\)\n"):
        parse("-" * (MAX_DEPTH + 5) + "score")   # no chain: no hint
