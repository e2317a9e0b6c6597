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


@pytest.mark.parametrize("dtype, derive", [(torch.int32, lambda t: t.contiguous()),
                                           (torch.int64, lambda t: t.to(torch.int32))], ids=["itself", "copy"])
def test_a_memo_entry_goes_with_its_tensor(dtype, derive):
    # an entry held its value strongly until 255 newer ones pushed it out: fa4's "aux" of a contiguous int32 / float
    # named tensor is that tensor itself (t.contiguous()), so MEMO kept the user's tensor alive, and an int32 copy
    # of an int64 one outlived it (found by the lifetime audit)
    import gc
    import weakref

    from attnlang.memo import TensorMemo
    memo = TensorMemo()
    t = torch.arange(6, dtype=dtype)
    got = memo.get(t, "aux", derive)
    assert memo.get(t, "aux", lambda _: pytest.fail("not cached")) is got
    refs = weakref.ref(t), weakref.ref(got)
    del t, got
    gc.collect()
    assert [r() for r in refs] == [None, None] and not memo._entries
    t = torch.arange(6, dtype=dtype)
    memo.get(t, "aux", derive)
    t.add_(1)  # a new version: the entry is replaced, and the new one still goes with t
    got = memo.get(t, "aux", derive)
    assert torch.equal(got, torch.arange(1, 7).to(got.dtype))
    del t, got
    gc.collect()
    assert not memo._entries


@pytest.mark.parametrize("t", [torch.zeros(2)[::2], torch.zeros(3, 2, dtype=torch.int16)[:1, ::2],
                               torch.zeros(4, 2)[:, ::2]])
def test_a_strided_view_that_torch_calls_contiguous_binds(t):
    # one element (or one column) of a strided tensor: is_contiguous() is True whatever the stride, and the
    # checksum's byte view of it raised RuntimeError (found by differential fuzzing)
    from attnlang.memo import fingerprint
    assert fingerprint(t) == fingerprint(t.clone())
    q = torch.randn(1, 1, t.shape[0], 4)
    read = "t[kv_idx]" if t.dim() == 1 else "t[kv_idx, 0]"
    out = al.compile(score=f"score + float({read})")(q, q, q, backend="eager", t=t)
    torch.testing.assert_close(out, al.compile()(q, q, q, backend="eager"))


# ---------------------------------------------------------------------------------------------------------------
# 4. scores and lse that leave the compute dtype's range are errors on every backend; lse = -inf only where out = 0

@pytest.mark.parametrize("score, params, tensors, token", [
    ("score - 1e39", {}, {}, "1e39"),                      # was: lse -inf on every row, out finite
    ("score + 1e39", {}, {}, "1e39"),                      # was: lse +inf
    ("score + c", {"c": 1e308}, {}, "c"),                  # was: lse +inf (while score * c was refused)
    ("score * c", {"c": 1e308}, {}, "c"),
    ("score + t[q_idx]", {}, {"t": torch.full((6,), 1e39, dtype=torch.float64)}, "t[q_idx]"),
    ("score - t[kv_idx]", {}, {"t": torch.full((6,), 1e39, dtype=torch.float64)}, "t[kv_idx]"),
])
@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_float32_values_past_its_range_are_an_error(score, params, tensors, token, backend):
    q = torch.randn(1, 2, 6, 8, generator=torch.Generator().manual_seed(0))
    v = al.compile(score, params=params)
    with pytest.raises(al.AttnLangError, match="outside float32's range") as info:
        v(q, q, q, backend=backend, return_lse=True, **tensors)
    assert info.value.where == "score" and info.value.column == score.rindex(token) + 1


def test_float64_inputs_keep_float64_range():
    q = torch.randn(1, 2, 6, 8, dtype=torch.float64)
    out = al.compile("score - 1e39")(q, q, q, backend="eager")
    torch.testing.assert_close(out, al.compile("score")(q, q, q, backend="eager"))


@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_float64_lse_past_float32_stays_finite_in_float64(backend):
    q = torch.randn(1, 2, 6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    v = al.compile("score")
    _, lse = v(q, q, q, backend=backend, return_lse=True, scale=1e200)   # was: lse alternating -inf / +inf
    assert lse.dtype == torch.float64 and torch.isfinite(lse).all()     # float64 inputs: float64 lse (API.md)
    out = v(q, q, q, backend=backend, scale=1e200)                  # out alone is fine in float64
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("sign, backend", [(1.0, "eager"), (1.0, "flex"), (-1.0, "eager"), (-1.0, "flex")])
def test_row_term_overflowing_float32_in_the_product_is_never_a_lone_inf_lse(sign, backend):
    # t * 1e30 fits neither float32 nor the dropped-row-term shortcut: the score itself leaves the range
    q = torch.randn(1, 1, 4, 8, generator=torch.Generator().manual_seed(4))
    v = al.compile("score + t[q_idx] * 1e30")
    t = torch.tensor([0.0, sign * 1e10, 0.0, 0.0])
    if sign > 0:
        with pytest.raises(al.AttnLangError, match="inf"):
            v(q, q, q, backend=backend, return_lse=True, t=t)
        return
    out, lse = v(q, q, q, backend=backend, return_lse=True, t=t)
    assert lse[0, 0, 1] == -math.inf and bool((out[0, 0, 1] == 0).all())
    assert bool(torch.isfinite(lse[0, 0, [0, 2, 3]]).all())


# ---------------------------------------------------------------------------------------------------------------
# 5. NaN in masks: one rule on every backend. A comparison with NaN is False (IEEE; != is True), NaN propagates
#    through arithmetic, abs, min / max / clamp; a False mask masks. A NaN *score* at an allowed position is an error.

_T5 = torch.tensor([-1.0, 4.0, -2.0, 9.0, 0.25, -3.0, 1.0, 16.0])


def _ieee(mask: str, t: torch.Tensor) -> list[bool]:
    """The mask per kv_idx for q_idx = 0, with Python floats (IEEE) and NaN-propagating min / max / clamp."""
    def sqrt(x):
        return math.sqrt(x) if x >= 0 else math.nan

    def pmax(a, b):
        return a if (a >= b or a != a) else b

    def pmin(a, b):
        return a if (a <= b or a != a) else b
    fns = {"sqrt": sqrt, "max": pmax, "min": pmin, "clamp": lambda x, lo, hi: pmin(pmax(x, lo), hi),
           "abs": abs, "where": lambda c, a, b: a if c else b}
    cases = {
        "sqrt(-1.0) > 0.0": lambda j: sqrt(-1.0) > 0.0,
        "sqrt(-1.0) != 0.0": lambda j: sqrt(-1.0) != 0.0,
        "~(sqrt(-1.0) > 0.0)": lambda j: not sqrt(-1.0) > 0.0,
        "sqrt(t[kv_idx]) > 0.5": lambda j: sqrt(t[j]) > 0.5,
        "~(sqrt(t[kv_idx]) > 0.5)": lambda j: not sqrt(t[j]) > 0.5,
        "sqrt(t[kv_idx]) <= 2.0": lambda j: sqrt(t[j]) <= 2.0,
        "sqrt(t[kv_idx]) != sqrt(t[kv_idx])": lambda j: sqrt(t[j]) != sqrt(t[j]),
        "max(sqrt(t[kv_idx]), 0.0) >= 0.0": lambda j: fns["max"](sqrt(t[j]), 0.0) >= 0.0,
        "min(0.0, sqrt(t[kv_idx])) <= 0.0": lambda j: fns["min"](0.0, sqrt(t[j])) <= 0.0,
        "clamp(sqrt(t[kv_idx]), 0.0, 1.0) >= 0.0": lambda j: fns["clamp"](sqrt(t[j]), 0.0, 1.0) >= 0.0,
        "abs(sqrt(t[kv_idx])) >= 0.0": lambda j: abs(sqrt(t[j])) >= 0.0,
        "sqrt(t[kv_idx]) < 100.0 | kv_idx == 0": lambda j: sqrt(t[j]) < 100.0 or j == 0,
        "~(sqrt(t[kv_idx]) >= 1.0) & kv_idx < 6": lambda j: (not sqrt(t[j]) >= 1.0) and j < 6,
    }
    t = t.tolist()
    return [bool(cases[mask](j)) for j in range(len(t))]


@pytest.mark.parametrize("mask", ["sqrt(-1.0) > 0.0", "sqrt(-1.0) != 0.0", "~(sqrt(-1.0) > 0.0)",
                                  "sqrt(t[kv_idx]) > 0.5", "~(sqrt(t[kv_idx]) > 0.5)", "sqrt(t[kv_idx]) <= 2.0",
                                  "sqrt(t[kv_idx]) != sqrt(t[kv_idx])", "max(sqrt(t[kv_idx]), 0.0) >= 0.0",
                                  "min(0.0, sqrt(t[kv_idx])) <= 0.0", "clamp(sqrt(t[kv_idx]), 0.0, 1.0) >= 0.0",
                                  "abs(sqrt(t[kv_idx])) >= 0.0", "sqrt(t[kv_idx]) < 100.0 | kv_idx == 0",
                                  "~(sqrt(t[kv_idx]) >= 1.0) & kv_idx < 6"])
def test_nan_in_a_mask_follows_ieee_on_every_backend(mask):
    S = len(_T5)
    q = torch.zeros(1, 1, S, S)
    one_hot = torch.eye(S).view(1, 1, S, S)   # out[q_idx] is the allowed set of that row, averaged
    want = _ieee(mask, _T5)
    v = al.compile(mask=mask)
    tensors = {"t": _T5} if "t[" in mask else {}
    for backend in ("eager", "flex"):
        out, lse = v(q, q, one_hot, backend=backend, return_lse=True, **tensors)
        got = (out[0, 0, 0] > 0).tolist()
        assert got == want, (backend, got, want)
        assert (lse[0, 0, 0] == -math.inf) == (not any(want))


@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_nan_score_at_an_allowed_position_is_an_error_and_masked_nan_is_not(backend):
    q = torch.randn(1, 1, 8, 4, generator=torch.Generator().manual_seed(5))
    v = al.compile("score + sqrt(t[kv_idx])")
    with pytest.raises(al.AttnLangError, match="(?i)nan"):
        v(q, q, q, backend=backend, t=_T5)
    masked = al.compile("score + sqrt(t[kv_idx])", "t[kv_idx] >= 0.0")   # NaN only where masked
    assert torch.isfinite(masked(q, q, q, backend=backend, t=_T5)).all()


# ---------------------------------------------------------------------------------------------------------------
# 6. kernel_options with unknown keys are errors listing the known keys, on every backend

@pytest.mark.parametrize("backend, options, known", [
    ("eager", {"BACKED": "TRITON"}, "takes no kernel_options"),
    ("flex", {"BACKED": "TRITON"}, "BACKEND"),
    ("auto", {"BACKED": "TRITON"}, "fastmath"),
])
def test_unknown_kernel_options_are_an_error(backend, options, known):
    q = torch.randn(1, 1, 4, 8)
    v = al.compile(mask="q_idx >= kv_idx")
    with pytest.raises(al.AttnLangError, match="BACKED") as info:
        v(q, q, q, backend=backend, kernel_options=options)
    assert known in str(info.value)


def test_known_kernel_options_still_run():
    q = torch.randn(1, 1, 4, 8)
    v = al.compile(mask="q_idx >= kv_idx")
    want = v(q, q, q, backend="eager")
    for backend, options in (("flex", {"BACKEND": "TRITON"}), ("flex", {"CPU_COMPILED": False}),
                             ("auto", {"fastmath": True}), ("auto", {"BACKEND": "TRITON"})):
        torch.testing.assert_close(v(q, q, q, backend=backend, kernel_options=options), want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# wrong exception types: each an AttnLangError with a clear message

@pytest.mark.parametrize("text, match", [
    ('{"params": {"w": ' + "1" * 5000 + "}}", "cannot read"),
    ('{"params": ' + "[" * 100000, "nested too deeply|characters long"),
    ('{"params": ' + "[" * 30000, "nested too deeply"),
    ("mask: " + "[" * 20000, "nested too deeply"),
    ("? [a, b]\n: 1\n", "keys are names|mapping"),
])
def test_from_config_bad_text_is_an_attnlang_error(text, match):
    with pytest.raises(al.AttnLangError, match=match):
        al.from_config(text)


def test_from_config_size_is_checked_before_parsing(monkeypatch):
    import json

    import yaml

    def never(*args, **kwargs):
        raise AssertionError("a parser read a config text longer than the limit")
    monkeypatch.setattr(yaml, "load", never)
    monkeypatch.setattr(json, "loads", never)
    for text in ("mask: q_idx >= kv_idx\n" + "a: " + "x" * 5_000_000, b"x" * 5_000_000):
        with pytest.raises(al.AttnLangError, match="long; at most"):
            al.from_config(text)


@pytest.mark.parametrize("kw, match", [
    (dict(q_len=10, kv_len=10, block_size=10 ** 20), "at most 2\\*\\*62"),
    (dict(q_len=10, kv_len=10, device="meta"), "meta"),
])
def test_block_sparsity_argument_errors(kw, match):
    v = al.compile(mask="q_idx >= kv_idx")
    with pytest.raises(al.AttnLangError, match=match):
        v.block_sparsity(**kw)


def test_block_sparsity_takes_numpy_integers():
    np = pytest.importorskip("numpy")
    v = al.compile(mask="q_idx >= kv_idx")
    want = v.block_sparsity(q_len=10, kv_len=12, block_size=4).kind
    got = v.block_sparsity(q_len=np.int64(10), kv_len=np.int32(12), block_size=np.int64(4)).kind
    assert torch.equal(got, want)


def test_testing_kit_argument_errors():
    from attnlang.testing import Shape, assert_backends_agree, make_qkv, tensors_for
    v = al.compile(mask="q_idx >= kv_idx")
    with pytest.raises(al.AttnLangError, match="batch must be a positive int"):
        tensors_for(v, 0, 0, 0, 0)
    q, k, vv = make_qkv(Shape(1, 2, 2, 5, 5, 8))
    assert_backends_agree(v, q, k, vv, backend="eager", tolerances={torch.float32: (1e-3, 1e-3)})
    with pytest.raises(al.AttnLangError, match="tolerances"):
        assert_backends_agree(v, q, k, vv, backend="eager", tolerances={torch.float32: 1e-3})


# ---------------------------------------------------------------------------------------------------------------
# usability: constants as YAML / JSON values, YAML merge keys

@pytest.mark.parametrize("text, score, mask", [
    ("mask: True\n", "score", "True"),
    ("mask: false\n", "score", "False"),
    ("score: 0.5\n", "0.5", "True"),
    ("score: 2\n", "2.0", "True"),
    ('{"mask": true}', "score", "True"),
    ('{"score": -1.5, "mask": "q_idx >= kv_idx"}', "-1.5", "q_idx >= kv_idx"),
])
def test_config_constants_as_values(text, score, mask):
    assert al.from_config(text) == al.compile(score, mask)


@pytest.mark.parametrize("text, sink", [
    ("mask: q_idx >= kv_idx\nsink: 0\n", "0.0"),          # softmax plus one, as a YAML number
    ("sink: -1.5\n", "-1.5"),
    ("sink: -.inf\n", "-inf"),
    ('{"sink": 2}', "2.0"),
])
def test_config_sink_constants_as_values(text, sink):
    cfg = al.from_config(text)
    assert cfg == al.compile(mask=cfg.to_config()["mask"], sink=sink)


def test_config_yaml_merge_keys():
    text = "base: &b\n  window: 4\nmask: 0 <= q_idx - kv_idx < window\nparams:\n  <<: *b\n"
    with pytest.raises(al.AttnLangError, match="unknown key 'base'"):   # merge keys load; 'base' is still unknown
        al.from_config(text)
    text = "params:\n  <<: {window: 4, extra: 1}\n  extra: 2\nmask: 0 <= q_idx - kv_idx < window + extra\n"
    assert al.from_config(text) == al.compile(mask="0 <= q_idx - kv_idx < window + extra",
                                              params={"window": 4, "extra": 2})
    with pytest.raises(al.AttnLangError, match="twice"):
        al.from_config("params:\n  <<: {w: 1}\n  x: 2\n  x: 3\nmask: q_idx - kv_idx < w + x\n")


def test_tensor_read_only_in_the_mask_gets_a_zero_gradient():
    q = torch.randn(1, 1, 4, 8, requires_grad=True)
    t = torch.randn(4, requires_grad=True)
    v = al.compile("score", "t[kv_idx] > -10.0 | kv_idx == 0")
    out = v(q, q, q, backend="eager", t=t)
    grad, = torch.autograd.grad(out.sum(), t)
    assert grad is not None and torch.equal(grad, torch.zeros(4))


def test_int_and_float_params_differ_only_where_the_int_is_not_converted_as_documented():
    # score * w converts the int w to float (int op float is float): one canonical form, one variant
    assert al.compile("score * w", params={"w": 3}) == al.compile("score * w", params={"w": 3.0})
    assert al.compile(mask="q_idx // w >= 1", params={"w": 3}) != al.compile(mask="q_idx // w >= 1",
                                                                             params={"w": 3.0})
    assert "keeps its Python type" in al.compile.__doc__


def test_cli_explain_loads_and_checks_tensor_files_without_png(tmp_path, capsys):
    from attnlang.cli import main
    missing = tmp_path / "nope.pt"
    assert main(["explain", "--mask", "doc[q_idx] == doc[kv_idx]", "--tensor", f"doc={missing}"]) == 2
    assert "cannot read" in capsys.readouterr().err
    path = tmp_path / "doc.pt"
    torch.save(torch.zeros(8, dtype=torch.long), path)
    assert main(["explain", "--mask", "q_idx >= kv_idx", "--tensor", f"doc={path}"]) == 2
    assert "neither expression reads it" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# session 4 audit: stray exceptions found by a second hostile pass, one test each

@pytest.mark.parametrize("mask", ["int(floor(1e300)) > 0", "int(ceil(-1e300)) < 0"])
@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_int_of_a_float_constant_past_int64_is_an_overflow_error_not_a_value_error(mask, backend):
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(al.AttnLangError, match="64 bits") as info:
        al.compile(mask=mask)(q, q, q, backend=backend)
    assert info.value.column == 1 and "^" in str(info.value)


@pytest.mark.parametrize("backend", ["eager", "flex"])
@pytest.mark.parametrize("dtype, shift", [(torch.float32, 100.0), (torch.float16, 12.0)])
def test_normalize_false_numerator_past_the_range_is_an_error_not_inf_or_nan(backend, dtype, shift):
    torch.manual_seed(0)
    q = torch.randn(1, 2, 5, 4).to(dtype)
    v = torch.zeros(1, 2, 5, 4, dtype=dtype)
    v[..., 0] = 1  # inf * 0 was NaN in the other columns
    var = al.compile(score=f"score + {shift}", normalize=False)
    with pytest.raises(al.AttnLangError, match="normalize=False.*range"):
        var(q, q, v, backend=backend)
    out = al.compile(score=f"score + {shift / 2}", normalize=False)(q, q, v, backend=backend)
    assert torch.isfinite(out).all()


def test_scale_and_declared_value_ranges_past_float64_are_clean():
    q = torch.randn(1, 1, 4, 8)
    doc = torch.tensor([0, 0, 1, 1])
    var = al.compile(mask="doc[q_idx] == doc[kv_idx]")
    with pytest.raises(al.AttnLangError, match="scale must be finite"):
        var(q, q, q, backend="eager", doc=doc, scale=10 ** 400)
    want = var(q, q, q, backend="eager", doc=doc)
    got = var(q, q, q, backend="eager", doc=doc, kernel_options={"value_ranges": {"doc": (0, 10 ** 400)}})
    torch.testing.assert_close(got, want)


def test_a_named_tensor_passed_positionally_is_an_error_naming_the_keywords():
    q = torch.randn(1, 2, 4, 8)
    var = al.compile("score + bias[h]")
    with pytest.raises(al.AttnLangError, match="bias=<tensor>"):
        var(q, q, q, torch.zeros(2), backend="eager")


def test_cli_demo_with_a_length_too_large_to_allocate_exits_2_cleanly(capsys):
    from attnlang.cli import main
    assert main(["demo", "--seq-len", str(10 ** 13), "--only", "causal", "--backend", "eager"]) == 2
    err = capsys.readouterr().err
    assert "cannot allocate" in err and "--seq-len" in err and "Traceback" not in err


@pytest.mark.parametrize("use", [lambda a, b: a and b, lambda a, b: a or b, lambda a, b: not a,
                                 lambda a, b: b if a else None], ids=["and", "or", "not", "if"])
def test_variants_have_no_truth_value_so_the_words_cannot_compose_them_silently(use):
    a, b = al.compile(mask="q_idx >= kv_idx"), al.compile(mask="q_idx - kv_idx < 4")
    with pytest.raises(al.AttnLangError, match="no truth value.*&, \\| and ~"):
        use(a, b)


def test_libraries_that_test_a_callable_for_presence_see_a_variant_as_true():
    # torch 2.11's Dynamo evaluates `if inner_fn and callable(inner_fn)` on the called Variant: an error there
    # broke every compiled call (H200, session 5); code outside torch and the stdlib helpers still gets the error
    import types

    def probe(x):
        return bool(x)

    def probe_in(module):  # the same function, as if defined in that module
        return types.FunctionType(probe.__code__, {"__name__": module, "bool": bool})

    a = al.compile(mask="q_idx >= kv_idx")
    assert probe_in("torch._dynamo.symbolic_convert")(a) is True
    with pytest.raises(al.AttnLangError, match="no truth value"):
        probe_in("mymodel.layers")(a)


@pytest.mark.parametrize("use", [lambda a: 1 & a, lambda a: None | a, lambda a: a ^ a],
                         ids=["rand", "ror", "xor"])
def test_variant_operators_with_the_variant_on_the_right_or_xor_are_attnlang_errors(use):
    with pytest.raises(al.AttnLangError):
        use(al.compile(mask="q_idx >= kv_idx"))


@pytest.mark.parametrize("case", ["score", "sink"])
def test_distributed_errors_name_global_positions_and_the_users_expression(tmp_path, case):
    import torch.distributed as dist

    import attnlang.distributed as ald
    S = 16
    t = torch.zeros(S)
    t[11] = math.nan
    var = (al.compile(score="score + t[q_idx]", mask="q_idx >= kv_idx") if case == "score"
           else al.compile(mask="q_idx >= kv_idx", sink="t[q_idx]"))
    perm = torch.arange(S - 1, -1, -1)  # one rank holding the positions in reverse: local row 4 is position 11
    q = torch.randn(1, 1, S, 8)
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        with pytest.raises(al.AttnLangError) as info:
            ald.attention(var, q[:, :, perm], q[:, :, perm], q[:, :, perm], positions=[perm], backend="eager", t=t)
    finally:
        if own:
            dist.destroy_process_group()
    text = str(info.value)
    assert "q_idx=11" in text and "cp_" not in text, text
    assert "t[q_idx]" in text and "^" in text


def _testing_kit_calls():
    from attnlang import testing as kit
    v = al.compile(mask="q_idx >= kv_idx")
    shape = kit.Shape(1, 2, 1, 5, 5, 8)
    q, k, vv = kit.make_qkv(shape)
    return {
        "make_qkv_tuple": lambda: kit.make_qkv((1, 2, 1, 5, 5, 8)),
        "make_qkv_negative": lambda: kit.make_qkv(kit.Shape(1, 2, 1, -5, 5, 8)),
        "make_qkv_int_dtype": lambda: kit.make_qkv(shape, dtype=torch.int64),
        "make_qkv_device": lambda: kit.make_qkv(shape, device="nope"),
        "make_qkv_seed": lambda: kit.make_qkv(shape, seed="x"),
        "make_qkv_huge": lambda: kit.make_qkv(kit.Shape(1, 2, 1, 10 ** 12, 5, 8)),
        "tensors_for_not_a_variant": lambda: kit.tensors_for("q_idx", 1, 2, 5, 5),
        "tensors_for_seed": lambda: kit.tensors_for(v, 1, 2, 5, 5, seed=2 ** 70),
        "tensors_for_dtypes": lambda: kit.tensors_for(v, 1, 2, 5, 5, dtypes={"doc": "int"}),
        "tensors_for_strategies": lambda: kit.tensors_for(v, 1, 2, 5, 5, strategies=[1]),
        "named_tensors_shape": lambda: kit.named_tensors(v, (1, 2, 1, 5, 5, 8)),
        "agree_not_a_variant": lambda: kit.assert_backends_agree("x", q, k, vv),
        "agree_q_none": lambda: kit.assert_backends_agree(v, None, k, vv),
        "agree_int_qkv": lambda: kit.assert_backends_agree(v, q.long(), k.long(), vv.long()),
        "agree_grads": lambda: kit.assert_backends_agree(v, q, k, vv, backend="eager", grads="yes"),
        "agree_tolerance_key": lambda: kit.assert_backends_agree(v, q, k, vv, backend="eager",
                                                                 tolerances={"float32": (1e-3, 1e-3)}),
        "variants_depth": lambda: kit.variants(max_depth=10_000),
        "shapes_empty": lambda: kit.shapes(lengths=[]),
        "shapes_negative": lambda: kit.shapes(lengths=[-1]),
        "shapes_batch": lambda: kit.shapes(max_batch=0),
    }


@pytest.mark.parametrize("name", list(_testing_kit_calls()))
def test_testing_kit_wrong_arguments_are_attnlang_errors(name):
    with pytest.raises(al.AttnLangError):
        _testing_kit_calls()[name]()


def test_cli_param_int_of_thousands_of_digits_is_named_an_int_not_inf(capsys):
    from attnlang.cli import main
    assert main(["check", "--mask", "q_idx < w", "--param", "w=" + "9" * 5000]) == 2
    err = capsys.readouterr().err
    assert "64 bits" in err and "inf" not in err


@pytest.mark.parametrize("score, mask", [("where(score > 0.0, sqrt(score), score)", "True"),
                                         ("where(score > 0.0, sqrt(score), score)", "q_idx >= kv_idx"),
                                         ("where(q_idx == kv_idx, score * inf, score)", "q_idx != kv_idx")])
def test_eager_gradients_through_an_unchosen_where_branch_stay_finite(score, mask):
    torch.manual_seed(0)
    q = torch.randn(1, 2, 6, 4, requires_grad=True)
    k = torch.randn(1, 2, 6, 4, requires_grad=True)
    out = al.compile(score=score, mask=mask)(q, k, k.detach(), backend="eager")
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    with torch.no_grad():  # the values are those of the plain where
        s = (q @ k.transpose(-1, -2)) / 2.0
        if "sqrt" in score:
            s = torch.where(s > 0, s.clamp(min=0).sqrt(), s)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q, k, k, attn_mask=None if mask == "True" else (
                torch.ones(6, 6, dtype=torch.bool).tril() if ">=" in mask else ~torch.eye(6, dtype=torch.bool)),
            scale=0.5) if "sqrt" not in score else torch.softmax(
            s.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), -math.inf) if ">=" in mask else s, -1) @ k
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# round 2 (issue 19, helper cf2): call errors that were Python's TypeError or blamed the wrong thing

def test_no_heads_at_all_is_an_empty_result_not_a_head_ratio_error():
    q, kv = torch.randn(1, 0, 4, 8), torch.randn(1, 0, 4, 8)  # Hq % Hkv would divide by 0
    assert al.compile(mask="q_idx >= kv_idx")(q, kv, kv, backend="eager").shape == (1, 0, 4, 8)


@pytest.mark.parametrize("call, given, hint", [
    (lambda c, x: c(), 0, None),
    (lambda c, x: c(x, x), 2, None),
    (lambda c, x: c(x, x, v=x), 2, "v was given by name"),
    (lambda c, x: c(q=x, k=x, v=x), 0, "q, k, v were given by name"),
])
def test_missing_q_k_v_is_an_attnlang_error_not_a_type_error(call, given, hint):
    x = torch.randn(1, 1, 3, 4)
    with pytest.raises(al.AttnLangError, match=f"three positional arguments \\(q, k, v\\), got {given};") as info:
        call(al.compile(mask="q_idx >= kv_idx"), x)
    assert hint is None or hint in str(info.value)
    # a tensor the variant reads may be named v: then it is no hint
    with pytest.raises(al.AttnLangError, match="got 2; .*reads: v=<tensor>\\)$"):
        al.compile(score="score + v[h]")(x, x, v=torch.ones(1))
    assert al.compile(score="score + v[h]")(x, x, x, v=torch.ones(1)).shape == x.shape


@pytest.mark.parametrize("other, named", [
    (dict(mask="True", sink="0.0"), "sink '0.0'"), (dict(normalize=False), "normalize=False"),
    (dict(score="score * 2.0"), "score 'score * 2.0'"), (dict(score="score + c[h]"), "score 'score + c[h]'"),
])
def test_composing_a_variant_that_is_not_plain_names_what_is_not(other, named):
    causal, v = al.compile(mask="q_idx >= kv_idx"), al.compile(**other)
    for compose in (lambda: causal & v, lambda: v | causal, lambda: ~v):
        with pytest.raises(al.AttnLangError, match="composes masks only") as info:
            compose()
        assert str(info.value).endswith(f"but one has {named}")


@pytest.mark.parametrize("mask, params", [("a = t[q_idx]; True", {}), ("sum(t[i] for i in range(0)) == 0", {}),
                                          ("any(t[i] == kv_idx for i in range(K)) | q_idx >= kv_idx", {"K": 0})])
def test_a_tensor_read_only_where_the_result_never_looks_is_still_named_when_missing(mask, params):
    # a read in an unused binding or a reduction over range(0) is gone once expanded, but the variant reads the
    # tensor (tensor_names lists it): missing or mis-shaped, it was a KeyError from the caret's lookup
    x = torch.randn(1, 2, 4, 8)
    variant = al.compile(mask=mask, params=params)
    assert variant.tensor_names == ("t",)
    with pytest.raises(al.AttnLangError, match="tensor 't' is read here but was not given") as info:
        variant(x, x, x, backend="eager")
    assert info.value.column == 5 and "^^^^" in str(info.value)
    with pytest.raises(al.AttnLangError, match="has 2 dimensions"):
        variant(x, x, x, backend="eager", t=torch.ones(4, 4))
    for backend in ("eager", "flex"):
        assert variant(x, x, x, backend=backend, t=torch.ones(4)).shape == x.shape


def test_explain_says_fa4_is_not_available_where_flash_attn_is_not_installed(monkeypatch):
    # the attnlang.backends.fa4 module imports flash_attn lazily, so importing it proved nothing
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    text = al.compile(mask="q_idx >= kv_idx").explain()
    assert "fa4 backend: not available (flash-attn-4 is not installed" in text
    assert "fa4 backend: available" not in text and "flex backend: available" in text
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(
        name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "fa4 backend: flash-attn-4 installed, but FA4 needs a CUDA GPU" in al.compile().explain()


@pytest.mark.parametrize("backend", ["auto", "flex"])
@pytest.mark.parametrize("kernel", ["bogus", "triton", 1])
def test_a_misspelt_flex_kernel_is_an_error_also_where_auto_runs_another_backend(backend, kernel):
    # auto on the CPU runs eager, which ignores kernel_options: a kernel flex does not have was taken silently
    x = torch.randn(1, 1, 4, 8)
    with pytest.raises(al.AttnLangError, match="kernel_options\\['BACKEND'\\] must be one of 'AUTO', 'TRITON'"):
        al.compile(mask="q_idx >= kv_idx")(x, x, x, backend=backend, kernel_options={"BACKEND": kernel})
    assert al.compile(mask="q_idx >= kv_idx")(x, x, x, backend=backend, kernel_options={"BACKEND": "TRITON"}).shape \
        == x.shape


@pytest.mark.parametrize("backend", ["auto", "flex"])
@pytest.mark.parametrize("options, says", [
    ({"BLOCK_M": "64"}, "'BLOCK_M'\\] must be a positive int"),
    ({"fwd_BLOCK_N": 0}, "'fwd_BLOCK_N'\\] must be a positive int"),
    ({"BLOCK_M": 64.0}, "'BLOCK_M'\\] must be a positive int"),
    ({"num_warps": True}, "'num_warps'\\] must be a positive int"),
    ({"CPU_COMPILED": "false"}, "'CPU_COMPILED'\\] must be True or False"),
    ({"PRESCALE_QK": 1}, "'PRESCALE_QK'\\] must be True or False"),
])
def test_flex_kernel_options_of_the_wrong_kind_are_an_error(backend, options, says):
    # the CPU's flex kernel ignores the tile sizes and took these silently ("false" even compiled the kernel);
    # a GPU's Triton failed on them
    x = torch.randn(1, 1, 4, 8)
    v = al.compile(mask="q_idx >= kv_idx")
    with pytest.raises(al.AttnLangError, match=says):
        v(x, x, x, backend=backend, kernel_options=options)
    assert v(x, x, x, backend=backend, kernel_options={"BLOCK_M": 16, "CPU_COMPILED": False}).shape == x.shape


@pytest.mark.parametrize("good, bad, says", [
    (dict(scale=1), dict(scale=True), "scale must be a real number"),
    (dict(return_lse=True), dict(return_lse=1), "return_lse must be True or False"),
    (dict(backend="flex", kernel_options={"CPU_COMPILED": False}), dict(backend="flex", kernel_options={
        "CPU_COMPILED": 0}), "must be True or False"),
])
def test_a_warm_call_does_not_let_an_equal_value_of_the_wrong_type_through(good, bad, says):
    # the warm plan's key compared scale / return_lse / options with ==: True == 1, so after a call with scale=1
    # the refused scale=True ran (and return_lse=1 returned a tuple)
    x = torch.randn(1, 1, 4, 8)
    v = al.compile(mask="q_idx >= kv_idx - 1")
    v(x, x, x, **good)
    with pytest.raises(al.AttnLangError, match=says):
        v(x, x, x, **bad)


def test_fa4_kernel_options_of_the_wrong_kind_are_an_error_also_where_auto_runs_another_backend():
    # auto on the CPU runs eager: fastmath="no" was taken silently (fa4 checks its values only when it runs)
    x = torch.randn(1, 1, 4, 8)
    v = al.compile(mask="q_idx >= kv_idx")
    with pytest.raises(al.AttnLangError, match="take True or False; got fastmath='no'"):
        v(x, x, x, backend="auto", kernel_options={"fastmath": "no"})
    assert v(x, x, x, backend="auto", kernel_options={"fastmath": False, "BLOCK_M": 16}).shape == x.shape


@pytest.mark.parametrize("backend", ["eager", "flex"])
@pytest.mark.parametrize("score", ["score", "log(score)", "2.0 * score"])
def test_a_nan_score_from_q_or_k_itself_says_so_rather_than_blaming_the_expression(backend, score):
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    for bad_q, bad_k, what in ((q * 1e20, k * 1e20, "nan"), (q.index_fill(2, torch.tensor([0]), math.nan), k, "nan")):
        with pytest.raises(al.AttnLangError, match=f"scale \\* q·k is itself {what} \\(before the score expression\\)"):
            al.compile(score=score)(bad_q, bad_k, k, backend=backend)
    # the expression's own NaN keeps its hint, and a finite q·k gets none
    with pytest.raises(al.AttnLangError) as info:
        al.compile(score="score * inf - score * inf")(q, k, k, backend=backend)
    assert "q·k is itself" not in str(info.value)


@pytest.mark.parametrize("args, given", [(3, 3), (5, 5), (0, 0)])
def test_reference_with_too_few_or_too_many_positional_arguments_is_an_attnlang_error(args, given):
    x = torch.randn(1, 1, 3, 4)
    variant = al.compile(mask="t[q_idx] > 0")
    positional = [x, x, x, variant, torch.ones(3)][:args]
    with pytest.raises(al.AttnLangError, match=f"takes four positional arguments \\(q, k, v, variant\\), got {given}"):
        al.reference(*positional)
    assert al.reference(x, x, x, variant, t=torch.ones(3)).shape == x.shape


@pytest.mark.parametrize("which", [0, 1, 2])
def test_a_sparse_input_after_a_warm_dense_call_is_refused_by_the_checks(which):
    # the warm-plan key held shapes, dtypes and devices but not layouts: a sparse q / k / v of a warm call's shape
    # skipped the checks and failed inside the backend ("Cannot access storage of SparseTensorImpl")
    variant = al.compile(score="score + bias[h]", mask="q_idx >= kv_idx")
    qkv = [torch.randn(1, 2, 8, 16) for _ in range(3)]
    bias = torch.randn(2)
    variant(*qkv, bias=bias, backend="eager")
    qkv[which] = qkv[which].to_sparse()
    with pytest.raises(al.AttnLangError, match="dense"):
        variant(*qkv, bias=bias, backend="eager")


@pytest.mark.parametrize("backend", ["eager", "flex"])
@pytest.mark.parametrize("return_lse", [True, False])
def test_scale_times_qk_overflowing_to_minus_inf_is_an_error_not_a_masked_key(backend, return_lse):
    # float32's scale * q·k of -1e40 is -inf, which softmax took for a masked key: out 0 and lse -inf where the
    # float64 answer is out 1, lse -1e40 (found by differential fuzzing); now the overflow error, as for +inf
    q, v = torch.full((1, 1, 1, 1), 1e20), torch.ones(1, 1, 1, 1)
    with pytest.raises(al.AttnLangError, match="overflows float32") as info:
        al.compile()(q, q, v, scale=-1.0, backend=backend, return_lse=return_lse)
    assert info.value.where == "score"
    # an expression that turns that -inf into a finite score computes what float64 does: no error
    out = al.compile(score="max(score, -5.0)")(q, q, v, scale=-1.0, backend=backend)
    assert out.item() == 1.0
    # float64 inputs compute in float64: no overflow there
    out, lse = al.compile()(q.double(), q.double(), v.double(), scale=-1.0, backend=backend, return_lse=True)
    assert out.item() == 1.0 and math.isclose(lse.item(), -1e40, rel_tol=1e-6)
