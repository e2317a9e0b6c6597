"""GPU agreement of the fa4 backend with the eager reference: out, lse and gradients (q, k, v).

Every example in examples/, every LANGUAGE.md example, GQA, decode (q_len < kv_len), odd lengths, rows with no
allowed key, and generated variants (attnlang.testing when it exists). The reference runs in float32 on the same
bf16 inputs; tolerances are those of a bf16 attention kernel (relative Frobenius error of a few 1e-3).
"""

import importlib
import pkgutil

import pytest
import torch

import attnlang as al

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("needs_fa4")]

OUT_TOL = 1e-2      # ||out - ref|| / ||ref||
GRAD_TOL = 2e-2     # the same for dq, dk, dv
LSE_TOL = 2e-2      # max |lse - ref| over rows with an allowed key


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def check_agreement(variant, tensors, B=2, Hq=4, Hkv=None, Sq=257, Skv=None, D=64, grads=True, seed=0,
                    options=None, backend="fa4"):
    """Run ``variant`` on fa4 (or ``backend``) and on eager (float32) and assert out, lse and q/k/v gradients
    agree. With backend="fa4" the fa4 backend must take the call."""
    Hkv = Hkv or Hq
    Skv = Skv or Sq
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, Hkv, Skv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, Hkv, Skv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    dout = torch.randn(B, Hq, Sq, D, device="cuda", dtype=torch.bfloat16, generator=g)
    from attnlang.backends import fa4
    if backend == "fa4":
        plan = variant._plan(q, k, v, None, "fa4", True, options, tensors)
        probe = q.detach().requires_grad_(grads)  # unsupported() looks at whether q needs a gradient
        assert fa4.unsupported(probe, plan) is None, fa4.unsupported(probe, plan)

    qf, kf, vf = (t.float().detach().requires_grad_(grads) for t in (q, k, v))
    ref, ref_lse = variant(qf, kf, vf, backend="eager", return_lse=True, **tensors)
    qb, kb, vb = (t.detach().requires_grad_(grads) for t in (q, k, v))
    out, lse = variant(qb, kb, vb, backend=backend, return_lse=True, kernel_options=options, **tensors)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert _rel(out, ref) < OUT_TOL, f"out: rel err {_rel(out, ref):.2e}"
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty), "rows with no allowed key differ"
    if empty.any():
        assert float(out.float()[empty].abs().max()) == 0.0
    if (~empty).any():
        err = float((lse - ref_lse)[~empty].abs().max())
        assert err < LSE_TOL, f"lse: max abs err {err:.2e}"
    if grads:
        ref.backward(dout.float())
        out.backward(dout)
        for name, a, b in (("dq", qb.grad, qf.grad), ("dk", kb.grad, kf.grad), ("dv", vb.grad, vf.grad)):
            assert not torch.isnan(a).any(), f"{name} has NaN"
            assert _rel(a, b) < GRAD_TOL, f"{name}: rel err {_rel(a, b):.2e}"


def _examples():
    try:
        import attnlang.examples as pkg
    except ImportError:  # a source checkout on PYTHONPATH: the gallery is the top-level examples/ folder
        import examples as pkg
    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__))
    return [importlib.import_module(f"{pkg.__name__}.{n}") for n in names]


EXAMPLES = _examples()


@pytest.mark.parametrize("mod", EXAMPLES, ids=[m.NAME for m in EXAMPLES])
def test_every_example(mod):
    B, Hq = 2, 4
    Sq, Skv = mod.demo_lengths(257) if hasattr(mod, "demo_lengths") else (257, 257)
    tensors = mod.tensors(B, Hq, Sq, Skv, device="cuda")
    declined = _declined(mod.VARIANT, tensors, B, Hq, Sq, Skv, grads=True)
    if declined is None:
        check_agreement(mod.VARIANT, tensors, B=B, Hq=Hq, Sq=Sq, Skv=Skv)
        return
    # fa4 declines the training call (e.g. activation.py: relu's derivative 1 / max(score, 0) is infinite where
    # the weight is 0): backend="fa4" refuses it, "auto" trains on another backend, and fa4 runs the forward
    q = torch.randn(B, Hq, Sq, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(al.AttnLangError, match="cannot run this call"):
        mod.VARIANT(q, q, q, backend="fa4", **tensors)
    check_agreement(mod.VARIANT, tensors, B=B, Hq=Hq, Sq=Sq, Skv=Skv, backend="auto")
    if _declined(mod.VARIANT, tensors, B, Hq, Sq, Skv, grads=False) is None:
        check_agreement(mod.VARIANT, tensors, B=B, Hq=Hq, Sq=Sq, Skv=Skv, grads=False)


def _declined(variant, tensors, B, Hq, Sq, Skv, grads):
    """Why the fa4 backend declines a bf16 call of these shapes (q needing a gradient when ``grads``), or None."""
    from attnlang.backends import fa4
    q = torch.zeros(B, Hq, Sq, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.zeros(B, Hq, Skv, 64, device="cuda", dtype=torch.bfloat16)
    plan = variant._plan(q, k, k, None, "fa4", True, None, tensors)
    return fa4.unsupported(q.requires_grad_(grads), plan)


LANGUAGE_EXAMPLES = [
    ("causal", "score", "q_idx >= kv_idx", {}),
    ("sliding_window", "score", "0 <= q_idx - kv_idx < window", {"window": 100}),
    ("alibi", "score + slope[h] * (kv_idx - q_idx)", "q_idx >= kv_idx", {}),
    ("softcap", "cap * tanh(score / cap)", "q_idx >= kv_idx", {"cap": 20.0}),
    ("document", "score", "doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx", {}),
    ("prefix_lm", "score", "kv_idx < prefix | q_idx >= kv_idx", {"prefix": 70}),
    ("decode", "score", "kv_idx <= q_idx + kv_len - q_len", {}),
]


def _tensors_for(score, mask, Hq, Skv):
    t = {}
    if "slope" in score:
        t["slope"] = torch.exp2(-8.0 * torch.arange(1, Hq + 1, device="cuda", dtype=torch.float32) / Hq)
    if "doc" in mask:
        t["doc"] = (torch.arange(Skv, device="cuda") // 53).to(torch.int64)
    return t


@pytest.mark.parametrize("name,score,mask,params", LANGUAGE_EXAMPLES, ids=[e[0] for e in LANGUAGE_EXAMPLES])
def test_language_examples(name, score, mask, params):
    v = al.compile(score=score, mask=mask, params=params)
    Sq, Skv = (61, 300) if name == "decode" else (300, 300)
    check_agreement(v, _tensors_for(score, mask, 4, Skv), Sq=Sq, Skv=Skv, seed=1)


@pytest.mark.parametrize("grads", [True, False], ids=["fwd_bwd", "fwd"])
@pytest.mark.parametrize("name,score,mask", [
    ("causal", "score", "q_idx >= kv_idx"),
    ("alibi", "score + slope[h] * (kv_idx - q_idx)", "q_idx >= kv_idx"),
    ("softcap_window", "20 * tanh(score / 20)", "0 <= q_idx - kv_idx < 77"),
    ("document_bias", "score + bias[kv_idx]", "doc[q_idx] == doc[kv_idx]"),
])
def test_gqa(name, score, mask, grads):
    v = al.compile(score=score, mask=mask)
    tensors = _tensors_for(score, mask, 8, 200)
    if "bias" in score:
        tensors["bias"] = torch.randn(200, device="cuda", generator=torch.Generator(device="cuda").manual_seed(9))
    check_agreement(v, tensors, Hq=8, Hkv=2, Sq=200, seed=2, grads=grads)


@pytest.mark.parametrize("Sq,Skv", [(1, 333), (17, 500), (130, 129), (45, 67)])
def test_decode_and_odd_lengths(Sq, Skv):
    v = al.compile(score="score * 0.5 + float(kv_idx % 7) * 0.1", mask="kv_idx <= q_idx + kv_len - q_len")
    check_agreement(v, {}, Sq=Sq, Skv=Skv, seed=3)


def test_lengths_inside_a_mask_mod():
    # the extra conjunct keeps the mask out of the kernel's flags: q_len / kv_len come from seqlen_info
    v = al.compile(mask="kv_idx <= q_idx + kv_len - q_len & (kv_idx + q_len) % 5 != 3")
    check_agreement(v, {}, Sq=45, Skv=200, seed=7)


def test_rows_without_keys_give_zero_and_minus_inf():
    v = al.compile(mask="q_idx >= 100 & kv_idx <= q_idx")  # rows 0..99 have no key
    check_agreement(v, {}, Sq=257, seed=4)


def test_python_semantics_of_floor_div_mod_and_int():
    v = al.compile(score="score + float((q_idx - kv_idx) // 7) * 0.01 + float((kv_idx - q_idx) % 5) * 0.02"
                         " + float(int(score * 3.7)) * 0.05",
                   mask="(q_idx - kv_idx) % 3 != 1 | kv_idx > q_idx")
    check_agreement(v, {}, Sq=150, seed=5)


def test_baked_tables_and_tensor_versions():
    """slope[h] is baked into the module; changing the tensor in place must change the result."""
    v = al.compile(score="score * gain[h] + slope[h] * float(kv_idx - q_idx)", mask="q_idx >= kv_idx")
    g = torch.Generator(device="cuda").manual_seed(8)
    tensors = {"gain": torch.rand(4, device="cuda", generator=g) + 0.5,
               "slope": torch.rand(4, device="cuda", generator=g) * 0.1}
    check_agreement(v, tensors, Sq=130, seed=8)
    tensors["gain"].mul_(2.0)  # in place: a new version, so new baked values
    check_agreement(v, tensors, Sq=130, seed=8, grads=False)


@pytest.mark.parametrize("score", ["score", "score + bias[kv_idx]"])
def test_tile_aligned_documents_run_without_mask_mod(score):
    # documents on 128-token boundaries: every tile is full or empty, so the kernel runs from the tile lists alone
    v = al.compile(score=score, mask="doc[q_idx] == doc[kv_idx]")
    g = torch.Generator(device="cuda").manual_seed(10)
    tensors = {"doc": torch.arange(512, device="cuda") // 256}
    if "bias" in score:
        tensors["bias"] = torch.randn(512, device="cuda", generator=g)
    check_agreement(v, tensors, Sq=512, seed=10)


def test_second_call_uses_caches():
    from attnlang.backends import fa4
    v = al.compile(mask="doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx")
    doc = torch.arange(300, device="cuda") // 37
    q = torch.randn(1, 2, 300, 64, device="cuda", dtype=torch.bfloat16)
    v(q, q, q, backend="fa4", doc=doc)
    n = len(fa4._SPARSITY)
    v(q, q, q, backend="fa4", doc=doc)
    assert len(fa4._SPARSITY) == n


def test_two_dim_tensor_and_bool_tensor():
    v = al.compile(score="score + rel[h, clamp(q_idx - kv_idx + 8, 0, 16)]", mask="keep[kv_idx] | q_idx == kv_idx")
    g = torch.Generator(device="cuda").manual_seed(6)
    tensors = {"rel": torch.randn(4, 17, device="cuda", generator=g),
               "keep": torch.rand(200, device="cuda", generator=g) > 0.3}
    check_agreement(v, tensors, Sq=200, seed=6)


def test_named_tensor_gradients_fall_back_to_flex():
    from attnlang.backends import fa4, select
    v = al.compile(score="score * gain[h]")  # (a per-row bias would be dropped from the score by the simplifier)
    q = torch.randn(1, 4, 64, 64, device="cuda", dtype=torch.bfloat16)
    gain = torch.ones(4, device="cuda", requires_grad=True)
    plan = v._plan(q, q, q, None, "auto", False, None, {"gain": gain})
    assert "named tensors" in fa4.unsupported(q, plan)
    assert select(q, plan)[0] != "fa4"


def test_generated_variants():
    """Random well-typed variants (attnlang.testing's strategy) on random odd shapes: fa4 against eager with
    attnlang.testing.assert_backends_agree (out, lse, and gradients of out and lse to q, k, v)."""
    from hypothesis import HealthCheck, assume, given, settings

    from attnlang.backends import fa4
    from attnlang.errors import AttnLangError
    from attnlang.testing import assert_backends_agree, make_qkv, shapes, tensors_for, variants

    ran = []

    @settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(variant=variants(max_depth=3), shape=shapes(head_dims=(32, 64)))
    def check(variant, shape):
        q, k, v = make_qkv(shape, dtype=torch.bfloat16, device="cuda")
        try:
            tensors = tensors_for(variant, shape.batch, shape.q_heads, shape.q_len, shape.kv_len, device="cuda")
            plan = variant._plan(q, k, v, None, "fa4", True, None, tensors)
        except AttnLangError:
            assume(False)
        assume(fa4.unsupported(q, plan) is None)
        assert_backends_agree(variant, q, k, v, backend="fa4", grads=True, named_grads=False, **tensors)
        ran.append(variant)

    check()
    assert ran, "no generated variant ran on fa4"


@pytest.mark.parametrize("options", [{"window_flags": False}, {"dense_tile_list": True}, {"bhsd_out": True},
                                     {"keep_mask_mod": True}], ids=lambda o: next(iter(o)))
@pytest.mark.parametrize("mask", ["True", "q_idx >= kv_idx", "0 <= q_idx - kv_idx < 100",
                                  "doc[q_idx] == doc[kv_idx]"])
def test_lowering_options_agree(options, mask):
    # every lowering the benchmark compares computes the same attention (tile-aligned lengths, so the tile-list
    # paths are taken); bhsd_out is an inference path
    v = al.compile(score="score + slope[h] * (kv_idx - q_idx)", mask=mask)
    tensors = {"slope": torch.tensor([0.5, 0.25, 0.125, 0.0625], device="cuda")}
    if "doc" in mask:
        tensors["doc"] = torch.arange(512, device="cuda") // 256
    check_agreement(v, tensors, Sq=512, seed=11, options=options, grads="bhsd_out" not in options)


# erf / cos / sin and int bit operations (issue 20): emitted for FA4, checked against eager; flex on both kernels
NEW_CONSTRUCTS = [
    ("erf_score", "score + erf(score / 4)", "q_idx >= kv_idx"),
    ("cos_sin_bias", "score + cos(float(q_idx - kv_idx) * 0.05) * sin(score)", "True"),
    ("xor_bits", "score", "((q_idx ^ kv_idx) & 7) != 3 | q_idx >= kv_idx"),
    ("shift_blocks", "score", "q_idx >> 4 == kv_idx >> 4 | (kv_idx | 1) == q_idx"),
    ("let_reduce", "r = sum(float((q_idx >> i & 1) * (kv_idx >> i & 1)) for i in range(6)); score + 0.1 * r",
     "d = q_idx - kv_idx; 0 <= d & d < 100"),
]


@pytest.mark.parametrize("name,score,mask", NEW_CONSTRUCTS, ids=[c[0] for c in NEW_CONSTRUCTS])
def test_new_constructs_on_fa4(name, score, mask):
    check_agreement(al.compile(score=score, mask=mask), {}, Sq=300, seed=3)


@pytest.mark.parametrize("kernel", ["TRITON", "FLASH"])
@pytest.mark.parametrize("name,score,mask", NEW_CONSTRUCTS, ids=[c[0] for c in NEW_CONSTRUCTS])
def test_new_constructs_on_flex(name, score, mask, kernel):
    v = al.compile(score=score, mask=mask)
    g = torch.Generator(device="cuda").manual_seed(4)
    q, k, w = (torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    ref = v(q.float(), k.float(), w.float(), backend="eager")
    if kernel == "FLASH" and (">>" in score + mask or "<<" in score + mask):
        # FLASH's code generator cannot compile shifts (H200, torch 2.11): refused up front, and auto runs TRITON
        with pytest.raises(al.AttnLangError, match="shifts"):
            v(q, k, w, backend="flex", kernel_options={"BACKEND": kernel})
        out = v(q, k, w, backend="flex")
    else:
        out = v(q, k, w, backend="flex", kernel_options={"BACKEND": kernel})
    assert _rel(out, ref) < OUT_TOL, f"out: rel err {_rel(out, ref):.2e}"



SHORT_Q = [  # decoding variants whose score_mod FA4 evaluates on every row of its query tile
    ("rel_table", "score + rel[h, clamp(q_idx + kv_len - q_len - kv_idx, 0, 255)]",
     "kv_idx <= q_idx + kv_len - q_len"),
    ("softcap", "30 * tanh(score / 30)", "kv_idx <= q_idx + kv_len - q_len"),
    ("window", "score", "0 <= q_idx + kv_len - q_len - kv_idx < 300"),
]


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Hq,Hkv,Sq", [(32, 8, 1), (32, 8, 16), (8, 8, 1)])
@pytest.mark.parametrize("name,score,mask", SHORT_Q, ids=[c[0] for c in SHORT_Q])
def test_decoding_on_the_short_query_tile(name, score, mask, Hq, Hkv, Sq, D):
    from attnlang.backends import fa4
    variant = al.compile(score=score, mask=mask)
    g = torch.Generator(device="cuda").manual_seed(1)
    tensors = {"rel": torch.randn(Hq, 256, device="cuda", generator=g)} if name == "rel_table" else {}
    q = torch.empty(2, Hq, Sq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.empty(2, Hkv, 1000, D, device="cuda", dtype=torch.bfloat16)
    plan = variant._plan(q, k, k, None, "fa4", False, None, tensors)
    # the call really runs the 64-row tile on this device (an H200)
    assert fa4._short_q_tile(q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2), {}, plan) \
        == {"tile_mn": fa4._SHORT_Q_TILE}
    check_agreement(variant, tensors, B=2, Hq=Hq, Hkv=Hkv, Sq=Sq, Skv=1000, D=D, grads=False)
