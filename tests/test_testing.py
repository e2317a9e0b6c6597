"""attnlang.testing: the strategies give well-typed, runnable variants and valid shapes; assert_backends_agree
passes on agreement and fails loudly on disagreement."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import attnlang as al
from attnlang.testing import (
    LANGUAGE_EXAMPLES,
    TENSOR_POOL,
    Shape,
    assert_backends_agree,
    language_examples,
    make_qkv,
    shapes,
    tensors_for,
    variants,
)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


@FAST
@given(shape=shapes())
def test_shapes_are_valid(shape):
    assert shape.q_heads % shape.kv_heads == 0
    assert min(shape.batch, shape.q_heads, shape.kv_heads, shape.q_len, shape.kv_len, shape.head_dim) >= 1
    assert shape.head_dim in (16, 32)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(shape=shapes(lengths=(45, 97)))
def test_shapes_cover_gqa_and_decode(shape):
    # each drawn shape is plain or decode-like; over the run both kinds appear (checked by hypothesis' search)
    assert shape.q_len <= shape.kv_len or shape.q_len in (45, 97)


@FAST
@given(variant=variants(), shape=shapes(lengths=(1, 7, 45)))
def test_generated_variants_run_on_eager(variant, shape):
    assert isinstance(variant, al.Variant)
    assert set(variant.tensor_names) <= set(TENSOR_POOL)
    q, k, v = make_qkv(shape)
    tensors = tensors_for(variant, shape.batch, shape.q_heads, shape.q_len, shape.kv_len)
    out, lse = variant(q, k, v, backend="eager", return_lse=True, **tensors)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert not (lse == math.inf).any()


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(variant=variants(tensors=False))
def test_variants_without_tensors_read_none(variant):
    assert variant.tensor_names == ()


def test_tensors_for_sizes_reads_in_bounds_and_infers_types():
    variant = al.compile("score + rel[h, clamp(q_idx - kv_idx, 0, 20)]", "doc[q_idx] == doc[kv_idx] & keep[b]")
    t = tensors_for(variant, batch=2, q_heads=3, q_len=45, kv_len=97)
    # every axis is at least 7 long (room for generated clamp(..., 0, 6) reads), else as long as its reads need
    assert t["rel"].shape == (7, 21) and t["rel"].dtype == torch.float32
    assert t["doc"].shape == (97,)
    assert t["keep"].dtype == torch.bool and t["keep"].shape[0] >= 2
    q, k, v = make_qkv(Shape(2, 3, 1, 45, 97, 16))
    variant(q, k, v, backend="eager", **t)


def test_tensors_for_explicit_dtypes_and_unbounded_index():
    variant = al.compile("score + w[int(f[kv_idx])]", "True")
    with pytest.raises(al.AttnLangError, match="unbounded"):
        tensors_for(variant, 1, 1, 7, 7, dtypes={"f": torch.float32, "w": torch.float32})
    variant = al.compile("score + w[ids[kv_idx]]", "True")
    t = tensors_for(variant, 1, 1, 7, 9, dtypes={"ids": torch.int64}, int_range=(0, 3))
    assert t["ids"].dtype == torch.int64 and t["ids"].shape == (9,) and t["w"].dtype == torch.float32


@pytest.mark.parametrize("int_range", [(2, 2), (5, 1), (0.5, 3), (True, 3), (3,), "ab", None, (0, 2 ** 63)])
def test_tensors_for_a_bad_int_range_is_an_attnlang_error(int_range):
    variant = al.compile(mask="doc[q_idx] == doc[kv_idx]")
    with pytest.raises(al.AttnLangError, match="int_range"):
        tensors_for(variant, 1, 1, 5, 5, int_range=int_range)
    assert tensors_for(variant, 1, 1, 5, 5, int_range=[-3, -1])["doc"].max() <= -2


def test_language_examples_are_all_there():
    got = language_examples(1, 2, 7, 9)
    assert [n for n, _, _ in got] == list(LANGUAGE_EXAMPLES)
    assert len(got) == 9  # the rows of LANGUAGE.md's table of examples, the sink and sigmoid ones included
    named = {n: (var, t) for n, var, t in got}
    sinks, tensors = named["learned_sinks_window"]
    assert sinks.sink == "sinks[h]" and tensors["sinks"].shape == (2,) and tensors["sinks"].dtype == torch.float32
    assert named["sigmoid"][0].normalize is False and named["sigmoid"][0].params == {"bias": 2.0}


def test_agree_passes_for_eager_vs_eager_with_grads():
    variant = al.compile("score + slope[h] * (kv_idx - q_idx)", "q_idx >= kv_idx")
    q, k, v = make_qkv(Shape(1, 4, 2, 7, 45, 16))
    assert_backends_agree(variant, q, k, v, backend="eager", reference="eager", grads=True,
                          slope=torch.rand(4))


def test_agree_fails_loudly_on_a_wrong_backend(monkeypatch):
    from attnlang.backends import eager

    real = eager.attention

    def off_by_a_bit(q, k, v, plan, chunk_size=None):
        out, lse = real(q, k, v, plan)
        return out + 1e-2, lse

    variant = al.compile(mask="q_idx >= kv_idx")
    q, k, v = make_qkv(Shape(1, 2, 2, 7, 7, 16))
    # "flex" on the CPU takes its own path; patch eager and compare it with an untouched copy through "flex"
    monkeypatch.setattr(eager, "attention", off_by_a_bit)
    with pytest.raises(AssertionError, match=r"(?s)out: \d+ of \d+ elements differ.*worst at .*variant: "):
        assert_backends_agree(variant, q, k, v, backend="flex", reference="eager", grads=False)


def test_agree_reports_nan_and_infinity_mismatch():
    from attnlang.testing import _compare
    with pytest.raises(AssertionError, match="NaN"):
        _compare("out", torch.tensor([float("nan")]), torch.tensor([0.0]), 1e-3, 1e-3, "")
    with pytest.raises(AssertionError, match="infinities differ"):
        _compare("lse", torch.tensor([0.0]), torch.tensor([-math.inf]), 1e-3, 1e-3, "")
    _compare("lse", torch.tensor([-math.inf, 1.0]), torch.tensor([-math.inf, 1.0 + 1e-5]), 1e-4, 1e-4, "")


@FAST
@given(variant=variants(sinks=True, unnormalized=True), shape=shapes(lengths=(1, 7, 45)))
def test_generated_sinks_and_unnormalized_variants_agree_on_flex(variant, shape):
    q, k, v = make_qkv(shape, dtype=torch.float64)
    tensors = tensors_for(variant, shape.batch, shape.q_heads, shape.q_len, shape.kv_len,
                          float_dtype=torch.float64)
    assert_backends_agree(variant, q, k, v, backend="flex", grads=False, **tensors)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(variant=variants(sinks=True, unnormalized=True))
def test_strategies_draw_sinks_and_unnormalized(variant):
    assert variant.sink is None or "kv_idx" not in variant.sink and "score" not in variant.sink
    # over the run both kinds appear (hypothesis explores them); every drawn one compiles
    assert isinstance(variant.normalize, bool)


_LATER = ("<<", ">>", "^", "sum(", "max((", "min((", "any(", "all(", "erf(", "cos(", "sin(", "mb = ", "sb = ")


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(variant=variants(extended=True, sinks=True, unnormalized=True), shape=shapes(lengths=(1, 7, 33)))
def test_extended_variants_draw_the_later_section_and_agree_on_flex(variant, shape):
    # extended=True: bit operations, reductions, erf / cos / sin and bindings (LANGUAGE.md's later section), every
    # draw runnable and in agreement between flex and the eager reference (float64, gradients of eager included)
    q, k, v = make_qkv(shape, dtype=torch.float64)
    tensors = tensors_for(variant, shape.batch, shape.q_heads, shape.q_len, shape.kv_len,
                          float_dtype=torch.float64)
    assert_backends_agree(variant, q, k, v, backend="flex", grads=False, **tensors)


def test_extended_variants_reach_every_later_construct():
    drawn = set()  # derandomized (tests/conftest.py): the same 300 draws on every run

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(variant=variants(extended=True))
    def collect(variant):
        text = variant.score + " " + variant.mask
        drawn.update(c for c in _LATER if c in text)

    collect()
    assert drawn == set(_LATER), set(_LATER) - drawn
    with pytest.raises(al.AttnLangError, match="extended must be True or False"):
        variants(extended="yes")
