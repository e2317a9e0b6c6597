"""The checker: every error kind of LANGUAGE.md as an AttnLangError with its line, column (1-based), source and a
caret under the offending token; types of well-formed expressions; the call-time checks of names and bounds."""

import pytest
import torch

import attnlang as al
from attnlang.ast import DType, walk
from attnlang.check import RESERVED_NAMES, bind, check


def caret_column(err) -> int:
    lines = str(err).split("\n")
    assert set(lines[-1].strip()) == {"^"}, str(err)
    return lines[-1].index("^") - 4 + 1


def caret_width(err) -> int:
    return str(err).split("\n")[-1].count("^")


def position(text: str, token: str, nth: int = 0) -> tuple[int, int]:
    """1-based (line, column) of the nth occurrence of token in text."""
    at = -1
    for _ in range(nth + 1):
        at = text.index(token, at + 1)
    before = text[:at]
    line = before.count("\n") + 1
    column = at - (before.rfind("\n") + 1) + 1
    return line, column


def assert_points_at(err, text, token, nth=0, where=None, width=None):
    line, column = position(text, token, nth)
    assert err.source == text
    assert (err.line, err.column) == (line, column), str(err)
    assert f"line {line}, column {column}" in str(err)
    assert caret_column(err) == column, str(err)
    assert str(err).split("\n")[-2] == "    " + text.split("\n")[line - 1]
    if where is not None:
        assert err.where == where
    if width is not None:
        assert caret_width(err) == width, str(err)


# (score, mask, params, expression the error is in, offending token, occurrence, caret width, word in message)
COMPILE_ERRORS = [
    # unknown function: the caret is under its name
    ("score + bar(q_idx)", "True", None, "score", "bar", 0, 3, "unknown function"),
    ("score", "q_idx >= foo(kv_idx, 1)", None, "mask", "foo", 0, 3, "unknown function"),
    # wrong arity
    ("score", "min(q_idx) > 0", None, "mask", "min", 0, None, "takes 2 arguments, got 1"),
    ("tanh(score, 1.0)", "True", None, "score", "tanh", 0, None, "takes 1 argument, got 2"),
    ("score + where(q_idx > 0, 1.0)", "True", None, "score", "where", 0, None, "takes 3"),
    ("score + exp()", "True", None, "score", "exp", 0, None, "got 0"),
    # a mask that is not bool
    ("score", "q_idx - kv_idx", None, "mask", "q_idx", 0, None, "must be bool"),
    ("score", "float(q_idx) * 0.5", None, "mask", "float", 0, None, "must be bool"),
    # a score that is bool
    ("q_idx > kv_idx", "True", None, "score", "q_idx", 0, None, "must be a number"),
    # score used in a mask
    ("score", "score > 0", None, "mask", "score", 0, 5, "'score' cannot be used in a mask"),
    ("score", "q_idx > 0 & score > 1", None, "mask", "score", 0, 5, "'score' cannot be used in a mask"),
    # a tensor used without an index
    ("score + bias[h] * bias", "True", None, "score", "bias", 1, 4, "without an index"),
    ("score", "doc == doc[kv_idx]", None, "mask", "doc", 0, 3, "without an index"),
    # a scalar parameter that was not given
    ("score", "0 <= q_idx - kv_idx < window", None, "mask", "window", 0, 6, "'window' was not given"),
    ("cap * tanh(score / cap)", "True", None, "score", "cap", 0, 3, "'cap' was not given"),
    # reserved names used as a scalar or a tensor
    ("score * scale", "True", None, "score", "scale", 0, 5, "scale"),
    ("score", "backend > 1", None, "mask", "backend", 0, None, "backend"),
    ("score", "return_lse", None, "mask", "return_lse", 0, None, "return_lse"),
    ("score + kernel_options", "True", None, "score", "kernel_options", 0, None, "kernel_options"),
    ("score + scale[h]", "True", None, "score", "scale", 0, None, "reserved"),
    ("score", "backend[q_idx] > 0", None, "mask", "backend", 0, None, "reserved"),
    ("score + exp[h]", "True", None, "score", "exp", 0, None, "reserved"),
    ("score + tanh", "True", None, "score", "tanh", 0, 4, "function 'tanh'"),
    ("score", "where", None, "mask", "where", 0, None, "function 'where'"),
    ("score + q_idx[0]", "True", None, "score", "q_idx", 0, None, "built-in"),
    # type errors
    ("score + (q_idx > kv_idx)", "True", None, "score", "q_idx", 0, None, "bool"),
    ("score * True", "True", None, "score", "True", 0, 4, "bool"),
    # & and | of ints are bitwise (LANGUAGE.md): an int mask, a mix of int and bool, ~ of an int are errors
    ("score", "q_idx & kv_idx", None, "mask", "q_idx & kv_idx", 0, None, "must be bool"),
    ("score", "q_idx >= 0 | kv_idx", None, "mask", "kv_idx", 0, 6, "mixes an int and a bool"),
    ("score", "~q_idx", None, "mask", "~q_idx", 0, None, "'~' of an int"),
    ("score", "not 1.5", None, "mask", "1.5", 0, 3, "expects a bool"),
    ("score + bias[0.5]", "True", None, "score", "0.5", 0, 3, "must be an int"),
    ("score + bias[q_idx / 2]", "True", None, "score", "q_idx / 2", 0, None, "must be an int"),
    ("score + bias[q_idx > 0]", "True", None, "score", "q_idx > 0", 0, None, "must be an int"),
    ("where(q_idx > 0, True, 1.0)", "True", None, "score", "where", 0, None, "where() branches"),
    ("score", "where(q_idx > 0, True, 1) == 1", None, "mask", "where", 0, None, "where() branches"),
    ("score + where(q_idx, 1.0, 0.0)", "True", None, "score", "q_idx", 0, None, "condition"),
    ("score", "1 == True", None, "mask", "1", 0, None, "compares a bool with a number"),
    ("score + abs(q_idx > 0)", "True", None, "score", "q_idx > 0", 0, None, "bool"),
    ("score + -(q_idx > 0)", "True", None, "score", "q_idx > 0", 0, None, "bool"),
    ("score + 2 ** -1", "True", None, "score", "-1", 0, None, "negative int power"),
    ("score", "q_idx // 0 == 1", None, "mask", "0", 0, None, "can be 0"),
    # tensors indexed with different numbers of indices
    ("score + rel[h] + rel[h, q_idx]", "True", None, "score", "rel", 1, None, "indices"),
    # an integer literal torch cannot hold
    ("score + 100000000000000000000", "True", None, "score", "100000000000000000000", 0, 21, "64 bits"),
    # multi-line expressions: line 2 (and 3), column N
    ("score", "q_idx >= kv_idx &\n    q_idx - kv_idx < window", None, "mask", "window", 0, 6, "window"),
    ("score +\n  slope[h] *\n  foo(kv_idx)", "True", None, "score", "foo", 0, 3, "unknown function"),
    ("score", "q_idx >= kv_idx\n& score > 0", None, "mask", "score", 0, 5, "cannot be used in a mask"),
    ("score", "q_idx >=\n\tbackend", None, "mask", "backend", 0, None, "backend"),
    ("score\n  * True", "True", None, "score", "True", 0, None, "bool"),
]


@pytest.mark.parametrize("score, mask, params, where, token, nth, width, word", COMPILE_ERRORS)
def test_compile_errors_point_at_the_token(score, mask, params, where, token, nth, width, word):
    if "q_idx // 0" in mask:  # a divisor that can be 0 is a call-time check, with the lengths known
        v = al.compile(score, mask, params)
        q = torch.zeros(1, 1, 3, 2)
        with pytest.raises(al.AttnLangError) as info:
            v(q, q, q, backend="eager")
    else:
        with pytest.raises(al.AttnLangError) as info:
            al.compile(score, mask, params)
    err = info.value
    assert word in err.message, str(err)
    assert_points_at(err, score if where == "score" else mask, token, nth, where, width)


def test_multiline_column_is_on_its_own_line():
    mask = "q_idx >= kv_idx &\n  q_idx < window"
    with pytest.raises(al.AttnLangError) as info:
        al.compile(mask=mask)
    err = info.value
    assert (err.line, err.column) == (2, 11)
    assert str(err).endswith("\n      q_idx < window\n              ^^^^^^")


def test_parameter_given_but_unused():
    with pytest.raises(al.AttnLangError, match="'window' is given but neither expression uses it"):
        al.compile(mask="q_idx >= kv_idx", params={"window": 3})
    with pytest.raises(al.AttnLangError, match="also unused: 'z'"):
        al.compile(mask="q_idx >= kv_idx", params={"y": 1, "z": 2})


@pytest.mark.parametrize("name", ["scale", "backend", "return_lse", "kernel_options", "where", "exp", "clamp",
                                  "int", "float", "score", "q_idx", "kv_len"])
def test_reserved_parameter_names(name):
    assert name in RESERVED_NAMES
    with pytest.raises(al.AttnLangError, match="reserved"):
        al.compile(score=f"score + {name}", params={name: 1.0})


@pytest.mark.parametrize("name", ["sum", "any", "all", "range"])
def test_reduction_names_cannot_name_a_scalar_or_a_tensor(name):
    # LANGUAGE.md: function names (the reductions too, and range) name no scalar and no tensor, as for bindings
    assert name in RESERVED_NAMES
    with pytest.raises(al.AttnLangError, match="reserved") as info:
        al.compile(score=f"score + {name}", params={name: 1.0})
    assert_points_at(info.value, f"score + {name}", name, 0, "score", len(name))
    with pytest.raises(al.AttnLangError, match="reserved") as info:
        al.compile(score=f"score + {name}[h]")
    assert_points_at(info.value, f"score + {name}[h]", name, 0, "score", None)
    with pytest.raises(al.AttnLangError, match="without arguments") as info:
        al.compile(score=f"score * {name}")
    assert_points_at(info.value, f"score * {name}", name, 0, "score", len(name))


@pytest.mark.parametrize("params, word", [
    ({"w": "3"}, "str"), ({"w": [1]}, "list"), ({"w": torch.tensor(1)}, "Tensor"),
    ({"w": float("nan")}, "finite"), ({"w": float("inf")}, "finite"), ({"w": 2 ** 70}, "64 bits"),
    ({1: 2}, "identifier"), ({"not a name": 1}, "identifier"),
])
def test_bad_parameter_values(params, word):
    with pytest.raises(al.AttnLangError, match=word):
        al.compile(mask="q_idx >= w" if "w" in params else "True", params=params)


def test_bad_params_container():
    with pytest.raises(al.AttnLangError):
        al.compile(params=[("w", 1)])
    with pytest.raises(al.AttnLangError):
        al.compile(score=3)
    with pytest.raises(al.AttnLangError):
        al.compile(mask=None)


def test_parameters_substituted_with_their_type():
    c = check("score * cap", "q_idx - kv_idx < w & flag", {"cap": 2, "w": 1.5, "flag": True})
    consts = {n.value: n.dtype for n in walk(c.mask) if type(n).__name__ == "Const"}
    assert consts == {1.5: DType.FLOAT, True: DType.BOOL}
    assert c.score.right.dtype is DType.INT and c.score.dtype is DType.FLOAT
    with pytest.raises(al.AttnLangError, match="bool"):
        al.compile(mask="q_idx > w", params={"w": True})  # a bool is not silently a number


TYPES = [
    ("q_idx + kv_idx", DType.INT),
    ("q_idx - 1", DType.INT),
    ("q_idx * 2", DType.INT),
    ("q_idx // 2", DType.INT),
    ("q_idx % 3", DType.INT),
    ("q_idx ** 2", DType.INT),
    ("q_idx / 2", DType.FLOAT),
    ("q_idx + 0.5", DType.FLOAT),
    ("-q_idx", DType.INT),
    ("int(score)", DType.INT),
    ("float(q_idx)", DType.FLOAT),
    ("float(q_idx > 0)", DType.FLOAT),
    ("abs(q_idx)", DType.INT),
    ("abs(score)", DType.FLOAT),
    ("min(q_idx, 2)", DType.INT),
    ("min(q_idx, 2.0)", DType.FLOAT),
    ("clamp(q_idx, 0, 3)", DType.INT),
    ("exp(q_idx)", DType.FLOAT),
    ("where(q_idx > 0, 1, 2)", DType.INT),
    ("where(q_idx > 0, 1, 2.0)", DType.FLOAT),
    ("q_idx < kv_idx", DType.BOOL),
    ("0 <= q_idx < 3", DType.BOOL),
    ("q_idx > 0 & kv_idx > 0", DType.BOOL),
    ("(q_idx > 0) == (kv_idx > 0)", DType.BOOL),
    ("where(q_idx > 0, True, False)", DType.BOOL),
    ("floor(score)", DType.FLOAT),
    ("sign(q_idx)", DType.INT),
]


@pytest.mark.parametrize("text, dtype", TYPES)
def test_types(text, dtype):
    c = check(text if dtype is not DType.BOOL else "score", text if dtype is DType.BOOL else "True")
    tree = c.mask if dtype is DType.BOOL else c.score
    if dtype is DType.BOOL:
        assert tree.dtype is DType.BOOL
    else:
        assert tree.dtype is dtype


def test_tensor_types_bound_at_call_time():
    c = check("score + x[h]", "True")
    assert c.tensors == {"x": 1}
    assert c.score.right.dtype is DType.UNKNOWN
    assert bind(c, {"x": DType.INT}).score.right.dtype is DType.INT
    assert bind(c, {"x": DType.FLOAT}).score.dtype is DType.FLOAT
    with pytest.raises(al.AttnLangError) as info:
        bind(c, {"x": DType.BOOL})
    assert_points_at(info.value, "score + x[h]", "x[h]", where="score")


# ----- call-time errors -----

def qkv(B=1, Hq=2, Hkv=1, Sq=5, Skv=7, D=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, Hq, Sq, D, generator=g, dtype=dtype), torch.randn(B, Hkv, Skv, D, generator=g,
            dtype=dtype), torch.randn(B, Hkv, Skv, D, generator=g, dtype=dtype))


def test_unused_tensor_keyword_at_call_time():
    q, k, v = qkv()
    var = al.compile(mask="q_idx >= kv_idx")
    with pytest.raises(al.AttnLangError, match="'doc' is given but neither expression reads it"):
        var(q, k, v, backend="eager", doc=torch.zeros(7, dtype=torch.long))


def test_index_out_of_bounds_for_these_lengths():
    mask = "doc[q_idx] == doc[kv_idx]"
    var = al.compile(mask=mask)
    q, k, v = qkv(Sq=5, Skv=7)
    var(q, k, v, backend="eager", doc=torch.zeros(7, dtype=torch.long))  # long enough for both
    with pytest.raises(al.AttnLangError) as info:
        var(q, k, v, backend="eager", doc=torch.zeros(6, dtype=torch.long))
    err = info.value
    assert "[0, 6]" in err.message and "[0, 5]" in err.message and "clamp" in err.message
    assert_points_at(err, mask, "kv_idx", where="mask", width=6)


def test_index_bounds_of_an_expression_and_clamp():
    score = "score + rel[h, q_idx - kv_idx + 4]"
    var = al.compile(score=score)
    q, k, v = qkv(Sq=5, Skv=7)
    with pytest.raises(al.AttnLangError) as info:  # q_idx - kv_idx + 4 ranges over [-2, 8]
        var(q, k, v, backend="eager", rel=torch.zeros(2, 9))
    assert "[-2, 8]" in info.value.message
    assert_points_at(info.value, score, "q_idx - kv_idx + 4", where="score")
    with pytest.raises(al.AttnLangError) as info:  # h ranges over [0, 1]
        var(q, k, v, backend="eager", rel=torch.zeros(1, 11))
    assert_points_at(info.value, score, "h", 0, where="score", width=1)
    fine = al.compile(score="score + rel[h, clamp(q_idx - kv_idx + 4, 0, 8)]")
    out = fine(q, k, v, backend="eager", rel=torch.zeros(2, 9))
    assert torch.isfinite(out).all()


def test_index_bounds_with_tensor_values():
    var = al.compile(score="score + x[ids[kv_idx]]")
    q, k, v = qkv(Sq=5, Skv=7)
    var(q, k, v, backend="eager", x=torch.zeros(4), ids=torch.tensor([0, 1, 2, 3, 3, 2, 1]))
    with pytest.raises(al.AttnLangError, match=r"\[0, 4\]"):
        var(q, k, v, backend="eager", x=torch.zeros(4), ids=torch.tensor([0, 1, 2, 3, 4, 2, 1]))
    with pytest.raises(al.AttnLangError, match="must be an int"):
        var(q, k, v, backend="eager", x=torch.zeros(4), ids=torch.zeros(7))


def test_decode_lengths_in_bounds():
    var = al.compile(score="score + pos[kv_idx - q_idx + q_len - 1]")
    q, k, v = qkv(Sq=2, Skv=7)
    # kv_idx - q_idx + q_len - 1 ranges over [0 - 1 + 1, 6 - 0 + 1] = [0, 7]
    var(q, k, v, backend="eager", pos=torch.zeros(8))
    with pytest.raises(al.AttnLangError, match=r"\[0, 7\]"):
        var(q, k, v, backend="eager", pos=torch.zeros(7))


def test_type_error_found_at_call_time_points_at_the_read():
    mask = "q_idx >= kv_idx & flags[kv_idx]"
    var = al.compile(mask=mask)
    q, k, v = qkv()
    var(q, k, v, backend="eager", flags=torch.ones(7, dtype=torch.bool))
    with pytest.raises(al.AttnLangError) as info:
        var(q, k, v, backend="eager", flags=torch.ones(7, dtype=torch.long))
    assert_points_at(info.value, mask, "flags", where="mask")


@pytest.mark.parametrize("mask, token", [
    ("q_idx < 2 ** 70", "2 ** 70"),
    ("q_idx < 10 ** 19", "10 ** 19"),
    ("q_idx * 4611686018427387904 > kv_idx", "q_idx * 4611686018427387904"),
    ("float(9223372036854775807 + kv_idx) > 0.0", "9223372036854775807 + kv_idx"),
])
def test_int_overflow_is_an_error_not_a_wrap(mask, token):
    var = al.compile(mask=mask)
    q, k, v = qkv()
    with pytest.raises(al.AttnLangError, match="64 bits") as info:
        var(q, k, v, backend="eager")
    assert_points_at(info.value, mask, token, where="mask")


def test_int_wraparound_inside_a_sum_is_exact():
    # 2**62 * 2 leaves int64 only in the middle of a sum whose value fits: two's complement gets it right
    var = al.compile(mask="q_idx + 2 ** 62 * 2 - 2 ** 62 * 2 >= kv_idx")
    ref = al.compile(mask="q_idx >= kv_idx")
    q, k, v = qkv()
    torch.testing.assert_close(var(q, k, v, backend="eager"), ref(q, k, v, backend="eager"))
    big = al.compile(mask="q_idx < 10 ** 18")
    torch.testing.assert_close(big(q, k, v, backend="eager"), al.compile()(q, k, v, backend="eager"))


def test_long_line_error_shows_a_window_with_the_caret_under_the_token():
    score = "score" + " + 0.5" * 20 + " + foo" + " + 0.5" * 30
    with pytest.raises(al.AttnLangError) as info:
        al.compile(score=score)
    err = info.value
    assert (err.line, err.column) == position(score, "foo")
    shown, caret = str(err).split("\n")[-2:]
    at = caret.index("^")
    assert shown[at:at + 3] == "foo" and caret.count("^") == 3
    assert len(shown) < 120 and "..." in shown


def test_int_overflow_of_a_whole_score_expression():
    score = "q_idx * 4611686018427387904 * 4"
    var = al.compile(score=score)
    q, k, v = qkv()
    with pytest.raises(al.AttnLangError, match="64 bits") as info:
        var(q, k, v, backend="eager")
    assert_points_at(info.value, score, score, where="score")


def test_caret_keeps_tabs_of_the_source_line():
    mask = "q_idx >=\n\t\tfoo"
    with pytest.raises(al.AttnLangError) as info:
        al.compile(mask=mask)
    err = info.value
    assert (err.line, err.column) == (2, 3)
    assert str(err).endswith("\n    \t\tfoo\n    \t\t^^^")


def test_int_power_with_a_possibly_negative_exponent_is_an_error():
    # Python gives a float for 2 ** -1; an int result would silently be 0
    q = torch.randn(1, 1, 20, 4)
    v = al.compile(score="score + 2 ** (q_idx - 10)")
    with pytest.raises(al.AttnLangError) as info:
        v(q, q, q)
    assert info.value.column == 15 and "negative" in info.value.message
    assert al.compile(score="score + 2 ** (q_idx // 4)")(q, q, q).shape == q.shape
    assert al.compile(score="score + 2.0 ** (q_idx - 10)")(q, q, q).shape == q.shape


@pytest.mark.parametrize("where, index, size", [
    ("q_idx", "int(erf(q_idx - 5.0) * 4) + 4", 8),        # erf(4.0) * 4: 3.99999994 in float64, 4.0 in float32
    ("kv_idx", "int(erf(kv_idx - 5.0) * 4) + 4", 8),
    ("kv_idx", "int(floor(erf(kv_idx - 5.0) * 4)) + 4", 8),
])
def test_index_through_int_of_a_float_covers_float32_rounding(where, index, size):
    # the backends compute floats in float32: an index that float32 rounds onto the next integer must be refused
    # (it read past the tensor: a bare IndexError), not let through by float64 bounds
    v = al.compile(score=f"score + u[{index}]")
    q = torch.randn(1, 1, 10, 4)
    with pytest.raises(al.AttnLangError, match="must stay in") as info:
        v(q, q, q, backend="eager", return_lse=True, u=torch.randn(size))
    assert_points_at(info.value, f"score + u[{index}]", index, 0, "score", len(index))
    out, lse = v(q, q, q, backend="eager", return_lse=True, u=torch.randn(size + 1))  # one longer: in bounds
    assert torch.isfinite(lse).all()


def test_index_through_int_of_an_exact_float_is_not_widened():
    # exact ends (q_idx * 0.5, float(q_idx)) keep their bounds: a tensor just long enough is accepted
    q = torch.randn(1, 1, 10, 4)
    for index, size in (("int(q_idx * 0.5)", 5), ("int(floor(kv_idx / 2))", 5), ("int(float(kv_idx))", 10)):
        al.compile(score=f"score + u[{index}]")(q, q, q, backend="eager", u=torch.randn(size))
