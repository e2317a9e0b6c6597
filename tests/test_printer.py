"""The canonical printer: fewest parentheses, and parse(to_source(e)) == e (a table and Hypothesis)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlang.ast import Binary, Call, Const, DType, Index, Op, Unary, Var
from attnlang.parse import parse
from attnlang.printer import to_source

CANONICAL = [
    # text -> canonical text
    ("q_idx >= kv_idx", "q_idx >= kv_idx"),
    ("(q_idx)>=(kv_idx)", "q_idx >= kv_idx"),
    ("0 <= q_idx - kv_idx < window", "0 <= q_idx - kv_idx & q_idx - kv_idx < window"),
    ("a and b or not c", "a & b | ~c"),
    ("(a | b) & c", "(a | b) & c"),
    ("a | (b & c)", "a | b & c"),
    ("~(a & b)", "~(a & b)"),
    ("~(a == b)", "~a == b"),
    ("(~a) == b", "(~a) == b"),
    ("(a < b) == c", "(a < b) == c"),
    ("a - (b - c)", "a - (b - c)"),
    ("(a - b) - c", "a - b - c"),
    ("a / (b * c)", "a / (b * c)"),
    ("(a + b) * c", "(a + b) * c"),
    ("-(2 ** 2)", "-2 ** 2"),
    ("(-2) ** 2", "(-2) ** 2"),
    ("(-a) ** 2", "(-a) ** 2"),
    ("(a ** b) ** c", "(a ** b) ** c"),
    ("a ** (b ** c)", "a ** b ** c"),
    ("a ** (-b)", "a ** -b"),
    ("2 ** -1", "2 ** -1"),
    ("-(-3)", "--3"),
    ("x - (-3)", "x - -3"),
    ("x * (-3)", "x * -3"),
    ("- 3", "-3"),
    ("-(3.5)", "-3.5"),
    ("-inf", "-inf"),
    ("1e-3", "0.001"),
    ("1E20", "1e+20"),
    ("5.", "5.0"),
    ("007", "7"),
    ("where(a,b,c)", "where(a, b, c)"),
    ("rel[ h , q_idx-kv_idx+512 ]", "rel[h, q_idx - kv_idx + 512]"),
    ("f(a,)", "f(a)"),
    ("score + slope[h] * (kv_idx - q_idx)", "score + slope[h] * (kv_idx - q_idx)"),
    ("cap * tanh(score / cap)", "cap * tanh(score / cap)"),
    ("doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx", "doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx"),
    ("kv_idx < prefix | q_idx >= kv_idx", "kv_idx < prefix | q_idx >= kv_idx"),
    ("kv_idx <= q_idx + kv_len - q_len", "kv_idx <= q_idx + kv_len - q_len"),
    ("True", "True"),
    ("False", "False"),
    ("-0.0", "-0.0"),
]


@pytest.mark.parametrize("text, canonical", CANONICAL)
def test_canonical_text(text, canonical):
    tree = parse(text)
    assert to_source(tree) == canonical
    assert parse(canonical) == tree
    assert to_source(parse(canonical)) == canonical


def test_hand_built_trees_round_trip():
    a, b = Var("a"), Var("b")
    trees = [
        Binary(Op.SUB, a, Binary(Op.ADD, a, b)),
        Binary(Op.POW, Unary(Op.NEG, a), Const(2, DType.INT)),
        Binary(Op.POW, Const(-2.5, DType.FLOAT), a),
        Binary(Op.POW, Binary(Op.POW, a, b), a),
        Binary(Op.MUL, Const(-3, DType.INT), a),
        Unary(Op.NEG, Const(-3, DType.INT)),
        Unary(Op.NEG, Binary(Op.POW, a, b)),
        Unary(Op.NOT, Unary(Op.NOT, a)),
        Binary(Op.LT, Binary(Op.LT, a, b), a),
        Binary(Op.EQ, a, Binary(Op.NE, a, b)),
        Binary(Op.AND, a, Binary(Op.AND, a, b)),
        Binary(Op.OR, Binary(Op.AND, a, b), Unary(Op.NOT, Binary(Op.OR, a, b))),
        Binary(Op.ADD, a, Unary(Op.NOT, b)),
        Binary(Op.POW, a, Unary(Op.NOT, b)),
        Index("x", (Binary(Op.OR, a, b), Const(-1, DType.INT))),
        Call("clamp", (Unary(Op.NEG, a), Const(0, DType.INT), Const(math.inf, DType.FLOAT))),
        Const(-math.inf, DType.FLOAT),
        Const(1e-300, DType.FLOAT),
        Const(2 ** 62, DType.INT),
    ]
    for tree in trees:
        assert parse(to_source(tree)) == tree, to_source(tree)


# ----- Hypothesis: random trees in the parser's image -----

_KEYWORDS = {"and", "or", "not", "inf", "True", "False"}
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True).filter(lambda s: s not in _KEYWORDS)
leaves = st.one_of(
    names.map(Var),
    st.integers(-10 ** 6, 10 ** 6).map(lambda v: Const(v, DType.INT)),
    st.floats(allow_nan=False).map(lambda v: Const(v, DType.FLOAT)),
    st.booleans().map(lambda v: Const(v, DType.BOOL)),
)
# BITAND / BITOR print as & / |, which parse as AND / OR: the checker, not the parser, tells them apart
BINARY_OPS = [op for op in Op if op not in (Op.NEG, Op.NOT, Op.BITAND, Op.BITOR)]


def _neg(x):
    # the parser folds a minus on a non-negative literal into the literal
    if isinstance(x, Const) and x.dtype is not DType.BOOL and not (x.value < 0 or math.copysign(1, x.value) < 0):
        return Const(-x.value, x.dtype)
    return Unary(Op.NEG, x)


def _extend(children):
    return st.one_of(
        st.tuples(st.sampled_from(BINARY_OPS), children, children).map(lambda t: Binary(*t)),
        children.map(_neg),
        children.map(lambda x: Unary(Op.NOT, x)),
        st.tuples(names, st.lists(children, max_size=3)).map(lambda t: Call(t[0], tuple(t[1]))),
        st.tuples(names, st.lists(children, min_size=1, max_size=3)).map(lambda t: Index(t[0], tuple(t[1]))),
    )


trees = st.recursive(leaves, _extend, max_leaves=25)


@settings(max_examples=300, deadline=None)
@given(trees)
def test_round_trip_random_trees(tree):
    text = to_source(tree)
    assert parse(text) == tree, text
    assert to_source(parse(text)) == text


@settings(max_examples=150, deadline=None)
@given(trees, st.sampled_from(["", " ", "\n", "  \t"]))
def test_extra_parentheses_and_spaces_do_not_change_the_tree(tree, pad):
    text = to_source(tree)
    padded = f"{pad}({pad}{text}{pad}){pad}"
    assert parse(padded) == tree
