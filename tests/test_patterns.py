"""Native pattern recognition on simplified variants, in the spellings the simplifier's normal forms give."""

import pytest

import attnlang as al
from attnlang.patterns import NativeLowering, recognize
from attnlang.printer import to_source


def rec(score="score", mask="True", params=None) -> NativeLowering:
    s = al.compile(score, mask, params).simplified
    return recognize(s.score, s.mask)


@pytest.mark.parametrize("mask", ["q_idx >= kv_idx", "kv_idx <= q_idx", "q_idx - kv_idx >= 0", "~(q_idx < kv_idx)",
                                  "kv_idx < q_idx + 1", "0 <= q_idx - kv_idx"])
def test_causal_top_left(mask):
    r = rec(mask=mask)
    assert (r.causal, r.window_left, r.window_right, r.alignment) == ("top_left", None, None, "top_left")
    assert r.residual_mask is None and r.softcap is None
    assert "causal (top-left)" in r.description()


@pytest.mark.parametrize("mask", ["kv_idx <= q_idx + kv_len - q_len", "q_idx - kv_idx >= q_len - kv_len",
                                  "kv_idx - kv_len < q_idx - q_len + 1"])
def test_causal_bottom_right(mask):
    r = rec(mask=mask)
    assert (r.causal, r.alignment, r.residual_mask) == ("bottom_right", "bottom_right", None)


@pytest.mark.parametrize("mask,params,left,right", [
    ("0 <= q_idx - kv_idx < 1024", None, 1023, 0),
    ("0 <= q_idx - kv_idx < window", {"window": 256}, 255, 0),
    ("q_idx - kv_idx < 1024 & kv_idx <= q_idx", None, 1023, 0),
    ("abs_ok & q_idx - 64 <= kv_idx & kv_idx <= q_idx + 32", None, 64, 32),
    ("kv_idx <= q_idx + 5", None, None, 5),
    ("kv_idx >= q_idx - 7", None, 7, None),
])
def test_windows(mask, params, left, right):
    mask = mask.replace("abs_ok & ", "")
    r = rec(mask=mask, params=params)
    assert (r.window_left, r.window_right) == (left, right)
    assert r.residual_mask is None
    assert r.causal == ("top_left" if right == 0 else None)


def test_residual_mask_keeps_other_conjuncts():
    r = rec(mask="doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx")
    assert r.causal == "top_left"
    assert to_source(r.residual_mask) == "doc[q_idx] == doc[kv_idx]"
    r = rec(mask="kv_idx < 1024 | q_idx >= kv_idx")
    assert r.causal is None and r.residual_mask is not None
    r = rec(mask="q_idx - kv_idx >= 5")  # strictly below the diagonal: no kernel flag
    assert r.causal is None and r.window_right is None and r.residual_mask is not None
    r = rec(mask="h < 4 & kv_idx <= q_idx + kv_len - q_len & q_idx >= kv_idx")
    assert r.causal in ("top_left", "bottom_right") and r.residual_mask is not None


@pytest.mark.parametrize("score,cap", [("30 * tanh(score / 30)", 30.0), ("tanh(score / 50.0) * 50.0", 50.0),
                                       ("cap * tanh(score / cap)", 20.0), ("tanh(score * 0.02) * 50", 50.0)])
def test_softcap(score, cap):
    r = rec(score=score, mask="q_idx >= kv_idx", params={"cap": 20.0} if "cap" in score else None)
    assert r.softcap == cap
    assert to_source(r.residual_score) == "score"
    assert "soft-capping" in r.description()


def test_softcap_with_more_score():
    r = rec(score="30 * tanh(score / 30) + bias[h, kv_idx]")
    assert r.softcap == 30.0 and to_source(r.residual_score) == "score + bias[h, kv_idx]"
    r = rec(score="30 * tanh(score / 20)")
    assert r.softcap is None and to_source(r.residual_score) == "30.0 * tanh(score / 20.0)"
    r = rec(score="30 * tanh(score / 30) + score")
    assert r.softcap is None


def test_nothing_native():
    r = rec()
    assert r == NativeLowering(residual_score=r.residual_score)
    assert r.description() == "no native pattern"
