"""The flex backend on CUDA, for both Flex kernels (TRITON and FLASH), against the eager reference.

Run: ``pytest -m gpu tests/test_flex_gpu.py -v -rA`` (about 40 compiles; the generated-variant tests are also
marked ``slow``: ``-m "gpu and not slow"`` leaves them out). FLASH tests need Hopper (sm90+) and flash_attn.cute
(flash-attn-4); they skip with the reason otherwise. Every test here compiles at least one flex kernel, so shapes
are few and small; the first test of a session also pays Inductor's start-up.
"""

import pytest
import torch

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

pytestmark = pytest.mark.gpu

KERNELS = ("TRITON", "FLASH")


def _flash_skip_reason():
    if not torch.cuda.is_available():
        return "needs CUDA"
    if torch.cuda.get_device_capability() < (9, 0):
        return f"FLASH needs sm90+, this GPU is sm{''.join(map(str, torch.cuda.get_device_capability()))}"
    try:
        import flash_attn.cute  # noqa: F401
    except Exception as e:
        return f"flash_attn.cute is not importable: {type(e).__name__}: {e}"
    return None


def _need(kernel):
    if kernel == "FLASH":
        why = _flash_skip_reason()
        if why:
            pytest.skip(why)


# one shape per example, so that odd lengths, GQA and decode are all covered without compiling every pair
_EXAMPLE_SHAPES = {
    "causal": Shape(2, 4, 2, 97, 97, 64),
    "sliding_window": Shape(1, 4, 4, 130, 130, 64),
    "alibi": Shape(2, 8, 2, 45, 130, 64),
    "softcap": Shape(1, 4, 1, 257, 257, 128),
    "document": Shape(2, 4, 2, 200, 200, 64),
    "prefix_lm": Shape(1, 6, 2, 130, 130, 64),
    "decode_causal": Shape(2, 8, 2, 7, 300, 64),
    "learned_sinks_window": Shape(1, 8, 2, 300, 300, 64),
    "sigmoid": Shape(2, 4, 2, 130, 97, 64),
}


def _example(name, shape, device="cuda"):
    for n, variant, tensors in language_examples(shape.batch, shape.q_heads, shape.q_len, shape.kv_len, device):
        if n == name:
            return variant, tensors
    raise KeyError(name)


# every example in bf16 on both kernels; fp16 on two of them (each case compiles a kernel: keep the count low)
_FORWARD_CASES = [(n, torch.bfloat16) for n in LANGUAGE_EXAMPLES] + [("alibi", torch.float16),
                                                                      ("document", torch.float16)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name,dtype", _FORWARD_CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in _FORWARD_CASES])
def test_language_examples_forward(name, dtype, kernel):
    _need(kernel)
    shape = _EXAMPLE_SHAPES[name]
    variant, tensors = _example(name, shape)
    q, k, v = make_qkv(shape, dtype=dtype, device="cuda", seed=1)
    assert_backends_agree(variant, q, k, v, backend="flex", grads=False, kernel_options={"BACKEND": kernel},
                          **tensors)


@pytest.mark.parametrize("name", ["alibi", "document", "decode_causal"])
def test_triton_float32_with_grads(name):
    # gradients to q, k, v and to the named floating tensor (ALiBi's slope) through the TRITON kernel
    shape = _EXAMPLE_SHAPES[name]
    variant, tensors = _example(name, shape)
    q, k, v = make_qkv(shape, dtype=torch.float32, device="cuda", seed=2)
    assert_backends_agree(variant, q, k, v, backend="flex", grads=True, kernel_options={"BACKEND": "TRITON"},
                          **tensors)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", ["alibi", "softcap"])
def test_bf16_grads(name, kernel):
    # FLASH cannot differentiate captured tensors: q, k, v only there
    _need(kernel)
    shape = _EXAMPLE_SHAPES[name]
    variant, tensors = _example(name, shape)
    q, k, v = make_qkv(shape, dtype=torch.bfloat16, device="cuda", seed=3)
    assert_backends_agree(variant, q, k, v, backend="flex", grads=True, named_grads=kernel != "FLASH",
                          lse_grads=kernel != "FLASH", kernel_options={"BACKEND": kernel}, **tensors)


@pytest.mark.parametrize("kernel", KERNELS)
def test_fully_masked_rows(kernel):
    # rows 0..9 see no key: out 0, lse -inf, never NaN (also in the backward pass)
    _need(kernel)
    variant = al.compile(mask="q_idx >= 10 & q_idx >= kv_idx")
    q, k, v = make_qkv(Shape(1, 2, 2, 97, 97, 64), dtype=torch.bfloat16, device="cuda")
    out, lse = variant(q, k, v, backend="flex", return_lse=True, kernel_options={"BACKEND": kernel})
    assert torch.all(out[:, :, :10] == 0)
    assert torch.all(lse[:, :, :10] == float("-inf"))
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert_backends_agree(variant, q, k, v, backend="flex", grads=True, lse_grads=kernel != "FLASH",
                          kernel_options={"BACKEND": kernel})


@pytest.mark.parametrize("kernel", KERNELS)
def test_no_recompile_on_new_tensors(kernel):
    _need(kernel)
    shape = Shape(2, 4, 2, 130, 130, 64)
    variant = al.compile("score + slope[h] * (kv_idx - q_idx)", "doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx")
    # FLASH takes no grads to named tensors; forward only keeps this test about compiles
    with torch.no_grad():
        for i in range(4):
            q, k, v = make_qkv(shape, dtype=torch.bfloat16, device="cuda", seed=10 + i)
            slope = torch.rand(shape.q_heads, device="cuda")
            doc = torch.randint(0, 3, (shape.q_len,), device="cuda").sort().values
            variant(q, k, v, backend="flex", kernel_options={"BACKEND": kernel}, slope=slope, doc=doc)
            if i == 0:
                before = flex.cache_info()
    after = flex.cache_info()
    assert after["graphs"] == before["graphs"], (before, after)
    assert after["compiled"] == before["compiled"], (before, after)
    assert after["flash_fallbacks"] == before["flash_fallbacks"], (before, after)


def test_auto_kernel_choice():
    # without kernel_options: FLASH for bf16 inference at head dim 64/128 on Hopper with flash_attn.cute, else
    # TRITON; the answer must agree with eager either way
    shape = Shape(1, 4, 2, 97, 97, 64)
    variant = al.compile(mask="q_idx >= kv_idx")
    q, k, v = make_qkv(shape, dtype=torch.bfloat16, device="cuda")
    plan = variant._plan(q, k, v, None, "flex", False, None, {})
    expected = "TRITON" if _flash_skip_reason() else "FLASH"
    assert flex.kernel_for(q, plan) == expected
    with torch.no_grad():
        out = variant(q, k, v, backend="flex")
        ref = variant(q, k, v, backend="eager")
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=2e-2)
    print(f"auto kernel: {expected}; cache {flex.cache_info()}")


@pytest.mark.slow
def test_generated_variants_triton():
    # a few generated variants (each compiles), forward and gradients, through TRITON
    from hypothesis import HealthCheck, Phase, given, settings

    @settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              phases=[Phase.explicit, Phase.generate])
    @given(variant=variants(max_depth=2), shape=shapes(head_dims=(32, 64)))
    def check(variant, shape):
        q, k, v = make_qkv(shape, dtype=torch.float32, device="cuda")
        tensors = tensors_for(variant, shape.batch, shape.q_heads, shape.q_len, shape.kv_len, device="cuda")
        assert_backends_agree(variant, q, k, v, backend="flex", grads=True, kernel_options={"BACKEND": "TRITON"},
                              **tensors)

    check()


@pytest.mark.slow
def test_generated_variants_flash():
    _need("FLASH")
    from hypothesis import HealthCheck, Phase, given, settings

    @settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              phases=[Phase.explicit, Phase.generate])
    @given(variant=variants(max_depth=2), shape=shapes(head_dims=(64, 128)))
    def check(variant, shape):
        q, k, v = make_qkv(shape, dtype=torch.bfloat16, device="cuda")
        tensors = tensors_for(variant, shape.batch, shape.q_heads, shape.q_len, shape.kv_len, device="cuda")
        assert_backends_agree(variant, q, k, v, backend="flex", grads=False, kernel_options={"BACKEND": "FLASH"},
                              **tensors)

    check()


def test_flash_refuses_a_gradient_through_lse():
    # FLASH's backward has no lse term: a loss that uses lse is an error, never a silently dropped term
    _need("FLASH")
    variant = al.compile(mask="q_idx >= kv_idx")
    q, k, v = make_qkv(Shape(1, 2, 2, 128, 128, 64), dtype=torch.bfloat16, device="cuda", requires_grad=True)
    out, lse = variant(q, k, v, backend="flex", return_lse=True, kernel_options={"BACKEND": "FLASH"})
    out.float().sum().backward(retain_graph=True)  # out alone: fine
    with pytest.raises(al.AttnLangError, match="cannot differentiate lse"):
        (out.float().sum() + lse.sum()).backward()


def test_big_int_values_keep_flash_off_automatically():
    # an int that can leave int32 (here 3_000_000_000 + kv_idx) must not run on FLASH, which computes int32
    from attnlang.backends import flex
    variant = al.compile(score="score + float((kv_idx + 3000000000) % 7)", mask="q_idx >= kv_idx")
    q, k, v = make_qkv(Shape(1, 2, 2, 128, 128, 64), dtype=torch.bfloat16, device="cuda")
    plan = variant._plan(q, k, v, None, "flex", False, None, {})
    assert flex.kernel_for(q, plan) == "TRITON"
    assert_backends_agree(variant, q, k, v, backend="flex", grads=False)


@pytest.mark.parametrize("kernel", ["TRITON", None])
def test_decoding_compiles_a_bounded_number_of_graphs(kernel):
    # one new key per growing kv_len would compile at every decoding step; the key turns dynamic at the second
    # length instead (see flex._callable), and each step still agrees with eager. kernel None: the automatic
    # choice (FLASH for the first length where it runs, then TRITON, whose graph serves every length)
    flex.clear_caches()
    variant = al.compile(score="score + slope[h] * (kv_idx - q_idx - kv_len + q_len)",
                         mask="q_idx + kv_len - q_len >= kv_idx")
    slope = torch.rand(4, device="cuda")
    options = {"BACKEND": kernel} if kernel else None
    before = None
    with torch.no_grad():
        for S in (200, 201, 202, 260, 400, 401):
            q, k, v = make_qkv(Shape(2, 4, 2, 1, S, 64), dtype=torch.bfloat16, device="cuda", seed=S)
            assert_backends_agree(variant, q, k, v, backend="flex", grads=False, kernel_options=options,
                                  slope=slope)
            if before is None:
                before = flex.cache_info()
    after = flex.cache_info()
    assert after["compiled"] - before["compiled"] <= 2, (before, after)
    assert after["graphs"] - before["graphs"] <= 3, (before, after)
