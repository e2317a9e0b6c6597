"""Conformance with LANGUAGE.md: spellings the language defines as the same meaning give one Variant (==, hash,
canonical form, config round trip), and evaluations match independent Python / float64 references."""

import pytest
import torch

import attnlang as al

CAUSAL = "q_idx >= kv_idx"


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
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    for backend in ("eager", "flex"):
        ox, lx = x(q, q, q, backend=backend, return_lse=True)
        oy, ly = y(q, q, q, backend=backend, return_lse=True)
        torch.testing.assert_close(ox, oy)
        torch.testing.assert_close(lx, ly)


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
