"""Fuzzing the front end: whatever string a user writes, al.compile returns a Variant or raises AttnLangError
(never another exception, never a RecursionError), and a compiled variant runs or raises AttnLangError."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnlang as al
from attnlang.parse import MAX_DEPTH, MAX_LENGTH

GRAMMAR_CHARS = "abcdefghijklmnopqrstuvwxyz_ABCTFXYZ0123456789.eE+-*/%<>=!&|~()[], \n\t"
TOKENS = [
    "score", "q_idx", "kv_idx", "b", "h", "q_len", "kv_len", "x", "doc", "window", "scale", "backend",
    "where", "abs", "min", "max", "clamp", "exp", "exp2", "log", "log2", "sqrt", "tanh", "sigmoid", "floor",
    "ceil", "sign", "float", "int", "foo",
    "0", "1", "2", "42", "0.5", "1e-3", "1e400", "99999999999999999999", "inf", "True", "False",
    "+", "-", "*", "/", "//", "%", "**", "<", "<=", ">", ">=", "==", "!=", "&", "|", "~", "and", "or", "not",
    "(", ")", "[", "]", ",", "\n",
]


def assert_clean(score="score", mask="True", params=None):
    try:
        var = al.compile(score, mask, params)
    except al.AttnLangError as e:
        text = str(e)  # rendering the caret must not fail either
        assert isinstance(text, str)
        if e.source is not None and e.line is not None:
            assert 1 <= e.line <= e.source.count("\n") + 1
            assert e.column >= 1
        return None
    return var


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=GRAMMAR_CHARS, max_size=60), st.booleans())
def test_grammar_characters(text, as_mask):
    assert_clean(mask=text) if as_mask else assert_clean(score=text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_arbitrary_unicode(text):
    assert_clean(score=text)
    assert_clean(mask=text)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40))
def test_bytes_and_non_strings(data):
    with pytest.raises(al.AttnLangError):
        al.compile(score=data)
    assert_clean(score=data.decode("latin-1"))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=30), st.booleans(),
       st.dictionaries(st.sampled_from(["window", "x", "foo", "scale", "q_idx"]),
                       st.one_of(st.integers(-3, 3), st.floats(allow_nan=True), st.booleans()), max_size=2))
def test_token_soup(tokens, as_mask, params):
    text = " ".join(tokens)
    assert_clean(mask=text, params=params) if as_mask else assert_clean(score=text, params=params)


def _qkv():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 1, 6, 4, generator=g)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=14), st.lists(st.sampled_from(TOKENS), min_size=1,
                                                                             max_size=14))
def test_token_soup_that_compiles_also_runs_cleanly(score_tokens, mask_tokens):
    var = assert_clean(" ".join(score_tokens), "True")
    var2 = assert_clean("score", " ".join(mask_tokens))
    q, k = _qkv()
    tensors = {"x": torch.zeros(8, dtype=torch.long), "doc": torch.zeros(8)}
    for v in (var, var2):
        if v is None:
            continue
        given_tensors = {n: tensors[n] for n in v.tensor_names if n in tensors}
        try:
            out = v(q, k, k, backend="eager", **given_tensors)
        except al.AttnLangError:
            continue
        assert not torch.isnan(out).any()


# ----- very long and very deeply nested input -----

@pytest.mark.parametrize("text", [
    " + ".join(["score"] * 10_000),
    " + ".join(["1.0"] * 10_000),
    " & ".join(["q_idx >= kv_idx"] * 10_000),
    "score" + " ** 1" * 10_000,
    "(" * 10_000 + "score" + ")" * 10_000,
    "(" * 100_000 + "score" + ")" * 100_000,
    "exp(" * 10_000 + "score" + ")" * 10_000,
    "f(" * 10_000 + "score" + ")" * 10_000,
    "x[" * 10_000 + "h" + "]" * 10_000,
    "-" * 10_000 + "score",
    "~" * 10_000 + "True",
    "not " * 5_000 + "True",
    " < ".join(["q_idx"] * 5_000),
    "(" * 10_000 + "score",
    "score" + ")" * 10_000,
    "where(" * 3_000 + "True, 1.0, 2.0)" + ", 1.0, 2.0)" * 2_999,
    "score" + " + score" * (MAX_LENGTH // 8),
])
def test_long_and_deep_give_a_result_or_a_clean_error(text):
    for score, mask in ((text, "True"), ("score", text)):
        assert_clean(score, mask)


def test_just_below_the_limits_runs():
    q, k = _qkv()
    deep = "tanh(" * (MAX_DEPTH - 2) + "score" + ")" * (MAX_DEPTH - 2)
    long = "score" + " - 0.5" * (MAX_DEPTH - 1)
    parens = "(" * 5_000 + "score" + ")" * 5_000
    for text in (deep, long, parens):
        var = al.compile(score=text)
        out = var(q, k, k, backend="eager")
        assert torch.isfinite(out).all()
        assert isinstance(var.explain(), str) and hash(var) == hash(al.from_config(var.to_config()))


def test_over_the_limits_is_a_clean_error():
    with pytest.raises(al.AttnLangError, match="nested too deeply"):
        al.compile(score="tanh(" * (MAX_DEPTH + 1) + "score" + ")" * (MAX_DEPTH + 1))
    with pytest.raises(al.AttnLangError, match="characters long"):
        al.compile(score="score" + " " * MAX_LENGTH)
