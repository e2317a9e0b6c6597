"""Audit of LANGUAGE.md's rules through the public API: probes that found bugs (non-finite row terms dropped by
the shift rule, int() and int ** int past int64, huge powers and products in the bounds analysis, errors without
a caret), and a few rules no other test states."""

import math
import signal
from contextlib import contextmanager

import pytest
import torch

import attnlang as al
from attnlang.check import bind, check
from attnlang.intervals import bounds
from attnlang.lower_torch import evaluate


def _qkv(b=1, h=2, sq=4, skv=5, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, s, d, generator=g, dtype=torch.float64) for s in (sq, skv, skv))


def _dense(q, k, v, score_fn, mask_fn):
    """Softmax attention written out element by element in float64: out, lse."""
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    out = torch.zeros(B, H, Sq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((B, H, Sq), -math.inf, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(Sq):
                s = [score_fn(float(q[b, h, i] @ k[b, h, j]) / math.sqrt(D), h, i, j) if mask_fn(h, i, j)
                     else -math.inf for j in range(Skv)]
                m = max(s)
                if m == -math.inf:
                    continue
                w = [math.exp(x - m) for x in s]
                lse[b, h, i] = m + math.log(sum(w))
                out[b, h, i] = sum(wj / sum(w) * v[b, h, j] for j, wj in enumerate(w))
    return out, lse


@contextmanager
def _deadline(seconds):
    """Fail (instead of hanging the suite) when the body runs longer than ``seconds``."""
    def stop(*_):
        raise TimeoutError(f"took longer than {seconds} s")
    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _assert_caret(e: al.AttnLangError, line: int, column: int):
    assert (e.line, e.column) == (line, column), str(e)
    assert "^" in str(e).splitlines()[-1]


# ----- a row term that is NaN must not be dropped by the shift rule (it was: NaN lse, no error) -----

@pytest.mark.parametrize("score, tensors", [
    ("score + 0.0 * inf", {}),                                         # 0 * inf is NaN, not 0
    ("score + 0.0 * x[h]", {"x": torch.tensor([math.inf, 1.0])}),     # the same with an inf read from a tensor
    ("score + (0.0 ** -1) % -1.5", {}),                                # inf % y is NaN
    ("score + (0.0 ** -1) // 2.0", {}),                                # inf // y is NaN
])
def test_nan_row_term_is_an_error_not_a_nan_lse(score, tensors):
    q, k, v = _qkv()
    var = al.compile(score)
    for return_lse in (False, True):
        with pytest.raises(al.AttnLangError, match="allowed position") as e:
            var(q, k, v, backend="eager", return_lse=return_lse, **tensors)
        _assert_caret(e.value, 1, 1)


@pytest.mark.parametrize("expr", ["0.0 * inf", "inf * 0", "(1.0 - 1.0) * inf", "inf % 2.0", "-inf % -3.0",
                                  "inf // 2.0", "-5.0 // inf", "5.0 // -inf", "5.0 % inf", "-5.0 % inf"])
def test_float_bounds_hold_what_torch_computes(expr):
    node = bind(check("score", f"{expr} > 0.0"), {}).mask.left
    r = bounds(node, {})
    val = float(evaluate(node, {}, {}, torch.float64))
    if math.isnan(val):
        assert r.lo == -math.inf and r.hi == math.inf, (expr, r)
    else:
        assert r.lo <= val <= r.hi, (expr, val, r)


# ----- ints are int64: int() and ** past 64 bits are errors, never a wrapped value -----

def test_int_of_a_float_past_int64_is_an_error():
    q, k, v = _qkv()
    with pytest.raises(al.AttnLangError, match="64 bits") as e:
        al.compile(mask="int(1e30) > 0")(q, k, v, backend="eager")      # was: every key masked
    _assert_caret(e.value, 1, 1)
    with pytest.raises(al.AttnLangError, match="64 bits") as e:
        al.compile("score + float(int(x[h]))")(q, k, v, backend="eager", x=torch.tensor([1e30, 1.0]))
    _assert_caret(e.value, 1, 15)
    # in range, int() truncates toward zero
    out = al.compile(mask="int(x[h]) == -2")(q, k, v, backend="eager", x=torch.tensor([-2.9, 2.9]))
    assert (out[0, 1] == 0).all() and (out[0, 0] != 0).any()


@pytest.mark.parametrize("mask, tensors", [
    ("x[h] ** x[h] > 0", {"x": torch.tensor([30, 0])}),       # 30 ** 30 wrapped around silently
    ("(-2) ** (q_idx * 100) > 0", {}),
    ("(q_idx - 2) ** (kv_idx * 30) != 0", {}),
])
def test_int_power_with_a_varying_exponent_past_int64_is_an_error(mask, tensors):
    q, k, v = _qkv()
    with pytest.raises(al.AttnLangError, match="outside 64 bits") as e:
        al.compile(mask=mask)(q, k, v, backend="eager", **tensors)
    assert e.value.line == 1 and "^" in str(e.value)


def test_int_power_with_a_varying_exponent_matches_python():
    q, k, v = _qkv(sq=4, skv=5)
    var = al.compile(mask="(q_idx - 2) ** kv_idx > 0")
    out, lse = var(q, k, v, backend="eager", return_lse=True)
    want_out, want_lse = _dense(q, k, v, lambda s, h, i, j: s, lambda h, i, j: (i - 2) ** j > 0)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mask", ["q_idx ** 1000000000 > 0", "2 ** 4611686018427387904 > q_idx",
                                  "2 ** (q_idx * 1000000000000) > 0",
                                  "q_idx" + " * 1000000000000000000" * 18 + " > 0"])
def test_huge_int_powers_and_products_are_quick_clean_errors(mask):
    q, k, v = _qkv()
    with _deadline(20):  # these hung (big-int powers) or raised OverflowError (int too large for a float)
        var = al.compile(mask=mask)
        with pytest.raises(al.AttnLangError, match="outside 64 bits") as e:
            var(q, k, v, backend="eager")
    assert e.value.line == 1


# ----- every error names the line and column, with a caret -----

def test_reserved_parameter_name_points_at_its_use():
    with pytest.raises(al.AttnLangError, match="reserved") as e:
        al.compile("score * scale", params={"scale": 2.0})
    _assert_caret(e.value, 1, 9)
    with pytest.raises(al.AttnLangError, match="reserved") as e:
        al.compile(mask="q_idx >= kv_idx\n& backend[h]", params={"backend": 1})
    _assert_caret(e.value, 2, 3)
    with pytest.raises(al.AttnLangError, match="reserved"):  # not used: no position to point at, still an error
        al.compile(params={"return_lse": True})


def test_nonfinite_score_error_points_at_the_score_expression():
    q, k, v = _qkv()
    with pytest.raises(al.AttnLangError, match=r"gives inf at b=\d+, h=\d+, q_idx=\d+, kv_idx=\d+") as e:
        al.compile("  score * inf")(q, k, v, backend="eager")
    _assert_caret(e.value, 1, 3)
    assert e.value.where == "score"


# ----- rules of LANGUAGE.md stated by no other test -----

PRECEDENCE = [
    ("q_idx == kv_idx == 2", lambda i, j: i == j == 2),
    ("2 ** 3 ** 2 == 512 & q_idx > 1", lambda i, j: 2 ** 3 ** 2 == 512 and i > 1),
    ("-q_idx % 3 == 1", lambda i, j: -i % 3 == 1),
    ("-q_idx // 2 == -1", lambda i, j: -i // 2 == -1),
    ("-kv_idx ** 2 == -4", lambda i, j: -j ** 2 == -4),
    ("not q_idx == kv_idx and kv_idx > 0 or q_idx == 0", lambda i, j: (not i == j and j > 0) or i == 0),
    ("~ q_idx < kv_idx | kv_idx == 4", lambda i, j: (not i < j) or j == 4),
    ("kv_idx * -1 >= -q_idx", lambda i, j: j * -1 >= -i),
    ("where(q_idx > kv_idx, True, kv_idx == 0)", lambda i, j: i > j or j == 0),
    ("float(q_idx > kv_idx) * 2.5 >= 2", lambda i, j: float(i > j) * 2.5 >= 2),
]


@pytest.mark.parametrize("mask, fn", PRECEDENCE, ids=[m for m, _ in PRECEDENCE])
def test_precedence_and_chains_match_python(mask, fn):
    q, k, v = _qkv()
    out, lse = al.compile(mask=mask)(q, k, v, backend="eager", return_lse=True)
    want_out, want_lse = _dense(q, k, v, lambda s, h, i, j: s, lambda h, i, j: fn(i, j))
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-6, rtol=1e-6)


def test_finite_row_terms_still_drop_out_and_come_back_in_lse():
    q, k, v = _qkv()
    var = al.compile("score + 0.5 * float(q_idx) - 1e-3 + x[h] * 0.0", "q_idx >= kv_idx")
    assert var.simplified.lse_shift is not None
    out, lse = var(q, k, v, backend="eager", return_lse=True, x=torch.tensor([1.0, -2.0]))
    want_out, want_lse = _dense(q, k, v, lambda s, h, i, j: s + 0.5 * i - 1e-3, lambda h, i, j: i >= j)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-6, rtol=1e-6)
