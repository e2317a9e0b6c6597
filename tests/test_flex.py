"""The flex backend on the CPU against the eager reference.

On the CPU, torch's compiled flex runs inference only, without lse: calls with ``return_lse`` (which every
``assert_backends_agree`` makes) run flex's unfused implementation, which compiles nothing and is fast at these
sizes. The compiled CPU kernel is exercised directly (one compile costs ~10 s on two cores; most are ``slow``).
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings

import attnlang as al
from attnlang.backends import flex
from attnlang.testing import (
    LANGUAGE_EXAMPLES,
    Shape,
    assert_backends_agree,
    language_examples,
    make_qkv,
    shapes,
    tensors_for,
    variants,
)

SHAPES = [
    Shape(2, 4, 2, 45, 97, 16),    # GQA, q_len < kv_len, odd lengths
    Shape(1, 3, 1, 130, 130, 32),  # group of 3, crosses the 128 block
    Shape(1, 2, 2, 1, 97, 16),     # one-token decode
]


class _NoLsePlan:
    """A CallPlan that says it needs no lse, so flex may take the compiled CPU kernel (what a plan with
    ``return_lse=False`` does once CallPlan carries that flag)."""

    def __init__(self, plan):
        self._plan = plan
        self.return_lse = False
        self.options = {**plan.options, "CPU_COMPILED": True}

    def __getattr__(self, name):
        return getattr(self._plan, name)


def _compiled_cpu(variant, q, k, v, **tensors):
    plan = _NoLsePlan(variant._plan(q, k, v, None, "flex", False, None, tensors))
    assert flex.unsupported(q, plan) is None
    with torch.no_grad():
        out, _ = flex.attention(q, k, v, plan)
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s.batch}x{s.q_heads}/{s.kv_heads}x{s.q_len}x{s.kv_len}")
@pytest.mark.parametrize("name", list(LANGUAGE_EXAMPLES))
def test_language_examples_agree(name, shape):
    q, k, v = make_qkv(shape, seed=1)
    (variant, tensors), = [(var, t) for n, var, t in language_examples(shape.batch, shape.q_heads, shape.q_len,
                                                                       shape.kv_len) if n == name]
    assert_backends_agree(variant, q, k, v, backend="flex", grads=False, **tensors)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_dtypes_agree(dtype):
    shape = SHAPES[0]
    q, k, v = make_qkv(shape, dtype=dtype)
    variant = al.compile("score + slope[h] * (kv_idx - q_idx)", "q_idx + kv_len - q_len >= kv_idx")
    assert_backends_agree(variant, q, k, v, backend="flex", grads=False, slope=torch.rand(shape.q_heads))


def test_semantics_of_integer_ops_and_reads():
    # Python-sign // and %, int() truncation toward zero, reads at computed (clamped) indices
    variant = al.compile("score + float((q_idx - kv_idx) // -3 % 5) - float(int(bias[clamp(kv_idx - q_idx, 0, 9)]))",
                         "(q_idx - kv_idx) % 7 != 3 | ids[kv_idx] == 1")
    shape = Shape(1, 2, 1, 45, 45, 16)
    q, k, v = make_qkv(shape)
    assert_backends_agree(variant, q, k, v, backend="flex", grads=False, bias=torch.randn(10) * 3,
                          ids=torch.randint(0, 3, (45,)))


def test_fully_masked_rows_give_zero_and_minus_inf():
    variant = al.compile(mask="q_idx >= 10 & q_idx >= kv_idx")
    q, k, v = make_qkv(Shape(1, 2, 2, 45, 45, 16))
    out, lse = variant(q, k, v, backend="flex", return_lse=True)
    assert torch.all(out[:, :, :10] == 0) and torch.all(lse[:, :, :10] == -math.inf)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert lse.dtype == torch.float32
    out, lse = al.compile(mask="False")(q, k, v, backend="flex", return_lse=True)
    assert torch.all(out == 0) and torch.all(lse == -math.inf)


def test_lse_shift_is_added():
    # a per-row score term: softmax drops it, lse keeps it (whether the simplifier moves it to lse_shift or not)
    variant = al.compile("score + 0.5 * float(q_idx) + rowbias[h]", "q_idx >= kv_idx")
    shape = SHAPES[0]
    q, k, v = make_qkv(shape)
    assert_backends_agree(variant, q, k, v, backend="flex", grads=False, rowbias=torch.randn(shape.q_heads))


def test_gradients_on_cpu_are_refused_with_a_reason():
    variant = al.compile(mask="q_idx >= kv_idx")
    q, k, v = make_qkv(SHAPES[0], requires_grad=True)
    plan = variant._plan(q, k, v, None, "flex", False, None, {})
    assert "backward" in flex.unsupported(q, plan)
    with pytest.raises(al.AttnLangError, match="backward"):
        variant(q, k, v, backend="flex")
    with torch.no_grad():
        variant(q, k, v, backend="flex")  # no grad mode: runs


def test_named_tensor_grad_on_cpu_is_refused():
    variant = al.compile("score + slope[h] * kv_idx", "True")
    q, k, v = make_qkv(SHAPES[0])
    with pytest.raises(al.AttnLangError, match="backward"):
        variant(q, k, v, backend="flex", slope=torch.rand(4, requires_grad=True))


def test_kernel_choice_and_override():
    variant = al.compile(mask="q_idx >= kv_idx")
    q, k, v = make_qkv(SHAPES[0])
    plan = variant._plan(q, k, v, None, "flex", False, None, {})
    assert flex.kernel_for(q, plan) is None          # CPU: flex's own kernel
    plan = variant._plan(q, k, v, None, "flex", False, {"BACKEND": "TRITON"}, {})
    assert flex.kernel_for(q, plan) == "TRITON"      # options override


def test_a_cached_block_mask_goes_with_its_mask_tensors():
    # the cache held a block mask (its mask_mod holds a detached alias of the mask tensors) until 64 newer ones
    # pushed it out: a new document-id tensor per batch kept the last 64 batches' ids and block tables alive
    # (found by the lifetime audit: the storage of a dropped doc tensor was still alive)
    import gc
    flex.clear_caches()
    variant = al.compile(mask="doc[q_idx] == doc[kv_idx]")
    q, k, v = make_qkv(Shape(1, 1, 1, 40, 40, 8))
    doc = torch.repeat_interleave(torch.arange(2), 20)
    with torch.no_grad():
        variant(q, k, v, backend="flex", doc=doc)
        variant(q, k, v, backend="flex", doc=doc)
    assert flex.cache_info()["block_masks_cached"] == 1
    memory = doc.untyped_storage()._weak_ref()
    try:
        del doc
        gc.collect()
        assert torch.UntypedStorage._expired(memory) and flex.cache_info()["block_masks_cached"] == 0
    finally:
        torch.UntypedStorage._free_weak_ref(memory)


def test_block_mask_cache_tracks_tensor_identity_and_version():
    flex.clear_caches()
    built = flex.cache_info()["block_masks"]
    variant = al.compile(mask="doc[q_idx] == doc[kv_idx]")
    q, k, v = make_qkv(Shape(1, 2, 2, 45, 45, 16))
    doc = torch.zeros(45, dtype=torch.long)
    with torch.no_grad():
        a = variant(q, k, v, backend="flex", doc=doc)
        variant(q, k, v, backend="flex", doc=doc)
        assert flex.cache_info()["block_masks"] == built + 1
        doc[20:] = 1                                   # in-place change: version bump, new block mask
        b = variant(q, k, v, backend="flex", doc=doc)
        assert flex.cache_info()["block_masks"] == built + 2
    torch.testing.assert_close(b, variant(q, k, v, backend="eager", doc=doc))
    assert not torch.allclose(a, b)
    # a variant whose mask reads no tensor caches by shape only
    causal = al.compile("score + s[h]", "q_idx >= kv_idx")
    with torch.no_grad():
        causal(q, k, v, backend="flex", s=torch.rand(2))
        causal(q, k, v, backend="flex", s=torch.rand(2))
    assert flex.cache_info()["block_masks"] == built + 3


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(variant=variants(), shape=shapes())
def test_generated_variants_agree(variant, shape):
    q, k, v = make_qkv(shape)
    tensors = tensors_for(variant, shape.batch, shape.q_heads, shape.q_len, shape.kv_len)
    assert_backends_agree(variant, q, k, v, backend="flex", grads=False, **tensors)


def test_compiled_cpu_kernel_agrees_and_does_not_recompile():
    # one compile (~10 s cold on two cores); later calls with new tensors of the same shapes reuse it
    variant = al.compile("score + slope[h] * (kv_idx - q_idx)", "doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx")
    shape = Shape(2, 4, 2, 45, 97, 16)
    before = None
    for seed in range(3):
        q, k, v = make_qkv(shape, seed=seed)
        tensors = {"slope": torch.rand(4), "doc": torch.randint(0, 3, (97,)).sort().values}
        out = _compiled_cpu(variant, q, k, v, **tensors)
        torch.testing.assert_close(out, variant(q, k, v, backend="eager", **tensors), atol=2e-4, rtol=2e-4)
        if before is None:
            before = flex.cache_info()
    after = flex.cache_info()
    assert after["graphs"] == before["graphs"] and after["compiled"] == before["compiled"], (before, after)


@pytest.mark.slow
@pytest.mark.parametrize("score,mask", [
    ("float(i_vec[kv_idx])", "4 <= q_idx - kv_idx < 21"),   # a score that ignores the score (torch CPU bug)
    ("0.5", "q_idx >= kv_idx & m_vec[clamp(q_len, 0, 6)]"),
])
def test_compiled_cpu_kernel_score_free_scores(score, mask):
    variant = al.compile(score, mask)
    shape = Shape(1, 3, 1, 97, 97, 16)
    q, k, v = make_qkv(shape)
    tensors = tensors_for(variant, shape.batch, shape.q_heads, shape.q_len, shape.kv_len)
    tensors = {n: (t | True) if t.dtype == torch.bool else t for n, t in tensors.items()}  # keep rows non-empty
    out = _compiled_cpu(variant, q, k, v, **tensors)
    torch.testing.assert_close(out, variant(q, k, v, backend="eager", **tensors), atol=2e-4, rtol=2e-4)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(LANGUAGE_EXAMPLES))
def test_compiled_cpu_kernel_language_examples(name, dtype):
    shape = SHAPES[0]
    q, k, v = make_qkv(shape, dtype=dtype, seed=4)
    (variant, tensors), = [(var, t) for n, var, t in language_examples(shape.batch, shape.q_heads, shape.q_len,
                                                                       shape.kv_len) if n == name]
    out = _compiled_cpu(variant, q, k, v, **tensors)
    ref = variant(q, k, v, backend="eager", **tensors)
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.slow
@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          phases=[Phase.explicit, Phase.generate])  # no shrinking: every step would compile a kernel
@given(variant=variants(max_depth=2), shape=shapes(head_dims=(16,)))
def test_compiled_cpu_kernel_generated_variants(variant, shape):
    q, k, v = make_qkv(shape)
    tensors = tensors_for(variant, shape.batch, shape.q_heads, shape.q_len, shape.kv_len)
    out = _compiled_cpu(variant, q, k, v, **tensors)
    torch.testing.assert_close(out, variant(q, k, v, backend="eager", **tensors), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("score", ["score + inf", "log(score - score - 1.0)"])
def test_nonfinite_score_at_an_allowed_position_is_an_error(score):
    q, k, v = make_qkv(Shape(1, 2, 2, 7, 7, 16))
    with pytest.raises(al.AttnLangError, match="allowed position"):
        al.compile(score, "True")(q, k, v, backend="flex")


def test_nonfinite_score_at_a_masked_position_is_fine():
    variant = al.compile("where(q_idx >= kv_idx, score, log(-1.0))", "q_idx >= kv_idx")
    q, k, v = make_qkv(Shape(1, 2, 2, 7, 7, 16))
    torch.testing.assert_close(variant(q, k, v, backend="flex"), variant(q, k, v, backend="eager"))


def test_int32_proof_for_the_flash_kernel():
    # FLASH computes ints in int32: allowed only when interval analysis proves every int fits
    from attnlang.backends import flex
    q = torch.randn(1, 2, 64, 16)
    small = al.compile(score="score + slope[h] * (kv_idx - q_idx)", mask="doc[q_idx] == doc[kv_idx]")
    plan = small._plan(q, q, q, None, "flex", False, None, {"slope": torch.rand(2), "doc": torch.arange(64) // 8})
    assert flex._ints_fit_int32(plan)
    big = al.compile(score="score + float((kv_idx + 3000000000) % 7)")
    assert not flex._ints_fit_int32(big._plan(q, q, q, None, "flex", False, None, {}))
    wide = al.compile(mask="doc[q_idx] == doc[kv_idx]")
    doc = torch.arange(64, dtype=torch.int64) * (1 << 40)
    assert not flex._ints_fit_int32(wide._plan(q, q, q, None, "flex", False, None, {"doc": doc}))


def test_evaluate_in_int32_gives_the_int64_values_when_they_fit():
    from attnlang.check import bind
    from attnlang.lower_torch import evaluate, positions
    v = al.compile(score="score + float((q_idx - 3 * kv_idx) // 5 % 7)")
    expr = bind(v._checked, {}).score
    names = positions(1, 1, 0, 9, 11)
    names["score"] = torch.zeros(1, 1, 9, 11)
    wide = evaluate(expr, names, {}, torch.float32)
    narrow = evaluate(expr, {n: t.to(torch.int32) if n != "score" else t for n, t in names.items()}, {},
                      torch.float32, int_dtype=torch.int32)
    assert torch.equal(wide, narrow)


def test_decoding_compiles_a_bounded_number_of_graphs():
    # kv_len grows by one per step: the first length gets a specialised graph, the second switches the key to a
    # graph dynamic in the sequence dims; crossing from one kv block to several may cost one more. Never one per
    # step (seconds each). Results equal eager at every length, also for expressions reading q_len / kv_len.
    variant = al.compile(score="score + slope[h] * (kv_idx - q_idx - kv_len + q_len)",
                         mask="q_idx + kv_len - q_len >= kv_idx & doc[kv_idx] >= 0")
    slope = torch.rand(2)
    before = None
    for S in (120, 121, 122, 129, 130, 260, 261):
        q, k, v = (torch.randn(1, 2, n, 32) for n in (1, S, S))
        doc = torch.arange(S) // 50
        with torch.inference_mode():
            out = variant(q, k, v, backend="flex", kernel_options={"CPU_COMPILED": True}, slope=slope, doc=doc)
        ref = variant(q, k, v, backend="eager", slope=slope, doc=doc)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
        if before is None:
            before = flex.cache_info()
    after = flex.cache_info()
    assert after["compiled"] - before["compiled"] <= 1, (before, after)
    assert after["graphs"] - before["graphs"] <= 2, (before, after)


def test_flash_is_not_chosen_for_floor_division():
    # GPU matrix: FLASH's forward of `(q_idx - kv_idx) % 5 != 2` was wrong on the H200; TRITON runs such calls
    q = torch.randn(1, 2, 64, 16)
    plan = al.compile(mask="(q_idx - kv_idx) % 5 != 2")._plan(q, q, q, None, "flex", False, None, {})
    assert flex._has_floor_division(plan)
    plan = al.compile(score="score + float(kv_idx // 3)")._plan(q, q, q, None, "flex", False, None, {})
    assert flex._has_floor_division(plan)
    plan = al.compile(mask="q_idx >= kv_idx")._plan(q, q, q, None, "flex", False, None, {})
    assert not flex._has_floor_division(plan)


def test_backward_is_compiled_once_per_key_with_the_graph_kept():
    # the eager probe of a lazily compiled backward: a zero upstream gradient, the caller's graph still usable
    flex._backward_compiled.clear()
    x = torch.randn(4, requires_grad=True)
    out = (x * 2).exp()
    flex._compile_backward_now(out, (x,), "key")
    assert "key" in flex._backward_compiled and x.grad is None
    flex._compile_backward_now(out, (x,), "key")  # a second call is a no-op
    out.sum().backward()  # the graph was retained
    torch.testing.assert_close(x.grad, 2 * (x * 2).exp())
    flex.clear_caches()
    assert not flex._backward_compiled


def test_backward_probe_of_an_already_compiled_backward_with_donated_buffers(monkeypatch):
    # AOTAutograd refuses retain_graph for a backward it compiled earlier with donated buffers, before running any
    # of it (H200: alibi_learned through flex under an outer torch.compile): the probe's job is done, no error;
    # any other failure of the probe still surfaces (where smaller tiles are retried)
    flex._backward_compiled.clear()
    x = torch.randn(4, requires_grad=True)
    out = (x * 2).exp()
    message = ("This backward function was compiled with non-empty donated buffers which requires "
               "create_graph=False and retain_graph=False.")
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError(message)))
    flex._compile_backward_now(out, (x,), "donated")
    assert "donated" in flex._backward_compiled
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("out of resource")))
    with pytest.raises(RuntimeError, match="out of resource"):
        flex._compile_backward_now(out, (x,), "other")
    assert "other" not in flex._backward_compiled
    flex.clear_caches()


def test_float64_lse_is_float64_on_eager_and_flex():
    # a float64 pipeline that uses lse (undoing the softmax, merging partial attention) keeps float64 digits
    variant = al.compile(score="score + slope[h] * (kv_idx - q_idx)", mask="q_idx >= kv_idx")
    q, k, v = make_qkv(Shape(1, 2, 2, 37, 45, 16), dtype=torch.float64)
    slope = torch.rand(2, dtype=torch.float64)
    s = (q @ k.transpose(-1, -2)) / 4.0 + slope.view(1, 2, 1, 1) * (torch.arange(45) - torch.arange(37).view(37, 1))
    s = s.masked_fill(torch.arange(45) > torch.arange(37).view(37, 1), -math.inf)
    want = torch.logsumexp(s, -1)
    for backend in ("eager", "flex"):
        out, lse = variant(q, k, v, backend=backend, return_lse=True, slope=slope)
        assert lse.dtype == torch.float64, backend
        torch.testing.assert_close(lse, want, rtol=1e-12, atol=1e-12)


def test_int_literals_meet_floats_on_compiled_cpu_flex():
    # compiled CPU flex failed with "'Tensor' object has no attribute 'get_dtype'" on an int literal times a float
    variant = al.compile(score="30 * tanh(score / 30) + 2 * score - score * 2", mask="q_idx >= kv_idx")
    q, k, v = make_qkv(Shape(1, 2, 2, 33, 33, 16), seed=3)
    with torch.no_grad():
        out = variant(q, k, v, backend="flex", kernel_options={"CPU_COMPILED": True})
    torch.testing.assert_close(out, variant(q, k, v, backend="eager"), atol=2e-5, rtol=1e-5)


def test_strided_named_tensors_on_compiled_cpu_flex():
    # Inductor's CPU flex template refused a strided view read by the score or the mask ("All the buffers in the
    # score and mask subgraph should be in kernel_group.args.input_buffers"), so a valid call failed with
    # KernelFailure (found by differential fuzzing): they go in contiguous
    variant = al.compile(score="score + float(ik[kv_idx])", mask="mk[kv_idx] | q_idx >= kv_idx")
    q, k, v = make_qkv(Shape(1, 2, 2, 16, 16, 8), seed=4)
    ik = torch.randint(0, 4, (32,))[::2]
    mk = (torch.rand(32) > 0.5)[::2]
    assert not ik.is_contiguous() and not mk.is_contiguous()
    with torch.no_grad():
        out = variant(q, k, v, backend="flex", kernel_options={"CPU_COMPILED": True}, ik=ik, mk=mk)
    torch.testing.assert_close(out, variant(q, k, v, backend="eager", ik=ik, mk=mk), atol=2e-5, rtol=1e-5)


def test_float_literals_that_change_between_variants_run_on_uncompiled_flex():
    # Uncompiled flex (CPU with lse or float64) compiles torch's one shared wrapper around the mods: a literal that
    # differs from the previous variant's was traced as a symbolic float on that recompile, and min / max / clamp's
    # guard check (math.isfinite of it) failed with "torch.* op returned non-Tensor"
    torch.manual_seed(0)
    q = torch.randn(1, 1, 8, 4, dtype=torch.float64)
    for cap in (1.375, 2.625, 3.875):
        variant = al.compile(f"min(score, {cap})", "q_idx >= kv_idx")
        out, lse = variant(q, q, q, backend="flex", return_lse=True)
        ref_out, ref_lse = variant(q, q, q, backend="eager", return_lse=True)
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(lse, ref_lse)


@pytest.mark.parametrize("return_lse", [False, True])  # compiled CPU flex (no lse) and uncompiled (lse)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_v_row_of_a_masked_key_does_not_reach_other_rows(return_lse, bad):
    # FlexAttention multiplies a whole tile of weights by v: a masked key's NaN / inf (a KV cache's unwritten
    # tail) made 0 * NaN = NaN in every row of its tile; LANGUAGE.md sums over the allowed keys only, so those
    # rows are finite, as on the eager reference, and only rows that attend the key see it
    variant = al.compile(mask="q_idx >= kv_idx & kv_idx < 6")
    q, k, v = make_qkv(Shape(1, 2, 2, 8, 8, 16), seed=3)
    v[0, :, 7] = bad            # no row attends key 7
    v[0, 1, 4, 3] = bad         # rows 4 and 5 of head 1 attend key 4
    got = variant(q, k, v, backend="flex", return_lse=return_lse)
    want = variant(q, k, v, backend="eager", return_lse=return_lse)
    got, want = (got[0], want[0]) if return_lse else (got, want)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5, equal_nan=True)
    assert torch.isfinite(got[0, 0]).all() and torch.isfinite(got[0, 1, :4]).all()
    assert not torch.isfinite(got[0, 1, 4:6, 3]).any()
