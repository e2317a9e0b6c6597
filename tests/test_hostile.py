"""What a hostile user found on the CPU (issue 19): silent wrong results and stray exceptions, one test each.

Each test names the behaviour it pins; each failed on the code before its fix.
"""


import math

import pytest
import torch

import attnlang as al

# ---------------------------------------------------------------------------------------------------------------
# 1. flex must never run another variant's kernel (Dynamo's cache of flex's unfused wrapper)


def _agree(variant, q, **tensors):
    got = variant(q, q, q, backend="flex", **tensors)
    want = variant(q, q, q, backend="eager", **tensors)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pair", [
    ("kv_idx < pre[0]", "kv_idx >= pre[0]"),
    ("kv_idx <= pre[0]", "kv_idx > pre[0]"),
    ("q_idx == pre[0]", "q_idx != pre[0]"),
])
def test_flex_masks_differing_in_comparison_do_not_share_a_kernel(pair):
    q = torch.randn(1, 2, 7, 4, generator=torch.Generator().manual_seed(0))
    pre = torch.tensor([3])
    a, b = (al.compile(mask=m) for m in pair)
    _agree(a, q, pre=pre)
    _agree(b, q, pre=pre)
    _agree(a, q, pre=pre)


def test_flex_scores_differing_in_comparison_do_not_share_a_kernel():
    q = torch.randn(1, 2, 7, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.5, -1.0, 2.0])
    a = al.compile(score="where(t[1] > 0.0, score, 0.0)")
    b = al.compile(score="where(t[1] < 0.0, score, 0.0)")
    _agree(a, q, t=t)
    _agree(b, q, t=t)


def test_flex_same_expression_other_lengths_reuses_nothing_wrong():
    # the lengths folded into the mods are part of the kernel's key too
    v = al.compile(mask="kv_idx <= q_idx + kv_len - q_len")
    for s in (5, 7, 5):
        q = torch.randn(1, 1, s, 4, generator=torch.Generator().manual_seed(s))
        k = torch.randn(1, 1, s + 2, 4, generator=torch.Generator().manual_seed(s + 1))
        torch.testing.assert_close(v(q, k, k, backend="flex"), v(q, k, k, backend="eager"), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# 2. int() of inf / NaN and int64 wrap-around are errors naming the overflow, with a caret

_INF = torch.full((4,), math.inf)
_NAN = torch.tensor([1.0, math.nan, 2.0, 3.0])
_MIN64 = torch.full((4,), -2 ** 63)


@pytest.mark.parametrize("mask, tensors, token", [
    ("int(t[kv_idx]) >= 0", {"t": _INF}, "int(t[kv_idx])"),
    ("int(t[kv_idx]) >= 0", {"t": -_INF}, "int(t[kv_idx])"),
    ("int(t[kv_idx]) >= 0", {"t": _NAN}, "int(t[kv_idx])"),
    ("int(clamp(t[kv_idx], -5.0, 5.0)) >= 0", {"t": _NAN}, "int(clamp"),   # NaN passes through clamp
    ("int(inf) >= 0", {}, "int(inf)"),
    ("int(inf - inf) >= 0", {}, "int(inf - inf)"),
    ("int(1.0 / float(q_idx - kv_idx)) >= 0", {}, "int(1.0"),              # 1.0 / 0.0 on the diagonal
    ("abs(t[kv_idx]) > 0", {"t": _MIN64}, "abs(t[kv_idx])"),
    ("t[kv_idx] // -1 > 0", {"t": _MIN64}, "t[kv_idx] // -1"),
])
@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_int_overflow_of_inf_nan_and_wraparound_is_an_error(mask, tensors, token, backend):
    q = torch.randn(1, 1, 4, 8)
    v = al.compile(mask=mask)
    with pytest.raises(al.AttnLangError, match="64 bits") as info:
        v(q, q, q, backend=backend, **tensors)
    err = info.value
    assert err.where == "mask" and err.column == mask.index(token) + 1, str(err)
    assert "overflow" in str(err) and "^" in str(err)


def test_int_of_finite_values_and_of_the_score_still_run():
    q = torch.randn(1, 1, 4, 8)
    t = torch.tensor([1.5, -2.5, 3.0, 1e9])
    out = al.compile(mask="int(t[kv_idx]) != 0")(q, q, q, backend="eager", t=t)
    assert torch.isfinite(out).all()
    out = al.compile("score + float(int(score * 3.7)) * 0.05")(q, q, q, backend="eager")
    assert torch.isfinite(out).all()
    ok = al.compile(mask="int(clamp(t[kv_idx], -5.0, 5.0)) >= 0")(q, q, q, backend="eager", t=_INF)
    assert torch.isfinite(ok).all()


# ---------------------------------------------------------------------------------------------------------------
# 3. writes PyTorch does not version (t.data[...] =, t.numpy()[...] =) are seen by the checks and caches (CPU)

def _unversioned_writes():
    def via_numpy(t, i, x):
        t.numpy()[i] = x

    def via_data(t, i, x):
        t.data[i] = x
    return [via_numpy, via_data]


@pytest.mark.parametrize("write", _unversioned_writes(), ids=["numpy", "data"])
@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_row_term_set_to_minus_inf_after_a_call_masks_its_row(write, backend):
    q = torch.randn(1, 1, 8, 4, generator=torch.Generator().manual_seed(2))
    v = al.compile("score + t[q_idx]")   # t[q_idx] is a row term: dropped from the score, added to lse
    t = torch.zeros(8)
    v(q, q, q, t=t, backend=backend, return_lse=True)
    write(t, 5, -math.inf)
    out, lse = v(q, q, q, t=t, backend=backend, return_lse=True)
    assert lse[0, 0, 5] == -math.inf and bool((out[0, 0, 5] == 0).all())
    assert bool(torch.isfinite(lse[0, 0, :5]).all())


@pytest.mark.parametrize("write", _unversioned_writes(), ids=["numpy", "data"])
@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_index_tensor_written_out_of_range_after_a_call_is_a_caret_error(write, backend):
    q = torch.randn(1, 1, 8, 4)
    src = "score + w[i[kv_idx]]"
    v = al.compile(src)
    i, w = torch.zeros(8, dtype=torch.long), torch.zeros(3)
    v(q, q, q, i=i, w=w, backend=backend)
    write(i, 3, 7)
    with pytest.raises(al.AttnLangError, match="index 0 of 'w'") as info:
        v(q, q, q, i=i, w=w, backend=backend)
    assert info.value.column == src.index("i[kv_idx]") + 1 and "^" in str(info.value)


@pytest.mark.parametrize("write", _unversioned_writes(), ids=["numpy", "data"])
def test_flex_block_mask_is_rebuilt_after_an_unversioned_write(write):
    q = torch.randn(1, 1, 256, 8, generator=torch.Generator().manual_seed(3))
    v = al.compile(mask="doc[q_idx] == doc[kv_idx]")
    doc = torch.zeros(256, dtype=torch.long)
    from attnlang.backends import flex
    v(q, q, q, doc=doc, backend="flex")
    built = flex.cache_info()["block_masks"]
    write(doc, slice(128, 256), 1)   # now two documents: the off-diagonal blocks are empty
    # (the unfused CPU kernel evaluates mask_mod everywhere; the compiled ones trust the blocks marked full)
    torch.testing.assert_close(v(q, q, q, doc=doc, backend="flex"), v(q, q, q, doc=doc, backend="eager"),
                               atol=1e-5, rtol=1e-5)
    assert flex.cache_info()["block_masks"] == built + 1


def test_inference_tensors_on_the_cpu_are_checked_and_cached_by_their_values():
    from attnlang.memo import TensorMemo
    memo, calls = TensorMemo(), []
    with torch.inference_mode():
        t = torch.zeros(4)
    for _ in range(2):
        memo.get(t, "x", lambda x: calls.append(1))
    assert len(calls) == 1
    t.numpy()[0] = 1.0
    memo.get(t, "x", lambda x: calls.append(1))
    assert len(calls) == 2
