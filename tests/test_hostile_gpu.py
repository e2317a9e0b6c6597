"""GPU halves of issue 19's items: what only the fa4 kernel can show.

NaN semantics of float min / max / clamp: they propagate NaN on every backend (as torch.minimum / maximum, which
eager and flex follow), so a mask comparing min / max / clamp of a NaN is False there, as in IEEE; fmin / fmax in
the CuTeDSL source would drop the NaN and allow those pairs (tests/test_usability.py checks the emitted text on the
CPU by running it over torch).
"""

import math

import pytest
import torch

import attnlang as al

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("needs_fa4")]


def _nan_table(n: int) -> torch.Tensor:
    """Floats in [-3, 3] with NaN at every third position (kv_idx 1, 4, 7, ...)."""
    t = torch.linspace(-3.0, 3.0, n, dtype=torch.float32)
    t[1::3] = math.nan
    return t.cuda()


@pytest.mark.parametrize("mask", [
    "max(t[kv_idx], -1.0) <= -1.0 | kv_idx == 0",
    "min(t[kv_idx], 1.0) >= 1.0 | kv_idx == 0",
    "min(1.0, t[kv_idx]) >= 1.0 | kv_idx == 0",
    "clamp(t[kv_idx], -1.0, 1.0) < 0.5 | kv_idx == 0",
    "max(sqrt(float(kv_idx) - 100.0), 0.5) <= 1.0 | kv_idx == 0",   # NaN from the expression itself
])
def test_fa4_mask_min_max_clamp_of_nan_are_false_as_on_eager(mask):
    from attnlang.backends import fa4
    B, H, S, D = 1, 2, 257, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    variant = al.compile(mask=mask)
    tensors = {"t": _nan_table(S)} if "t[" in mask else {}
    plan = variant._plan(q, k, v, None, "fa4", False, None, tensors)
    assert fa4.unsupported(q, plan) is None, fa4.unsupported(q, plan)
    with torch.no_grad():
        want = variant(q.float(), k.float(), v.float(), backend="eager", **tensors)
        got = variant(q, k, v, backend="fa4", **tensors)
    rel = float((got.float() - want).norm() / want.norm())
    assert rel < 1e-2, f"fa4 vs eager: rel err {rel:.3g} (NaN positions allowed by fa4?)"


@pytest.mark.parametrize("backend", ["auto", "flex"])
def test_a_floating_tensor_read_only_in_the_mask_gets_a_zero_gradient_on_cuda(backend):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 2, 130, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    t = torch.randn(130, device="cuda", generator=g).requires_grad_(True)
    v = al.compile("score", "t[kv_idx] > -1.0 | kv_idx == 0")
    out = v(q, q, q, backend=backend, t=t)
    grad_t, grad_q = torch.autograd.grad(out.float().sum(), (t, q))
    assert grad_t is not None and torch.equal(grad_t, torch.zeros_like(t))
    assert torch.isfinite(grad_q).all()


def test_testing_kit_default_call_compares_gradients_on_cuda():
    from attnlang.testing import Shape, assert_backends_agree, make_qkv, tensors_for
    v = al.compile("score + slope[h] * (kv_idx - q_idx)", "doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx")
    shape = Shape(1, 2, 2, 97, 97, 32)
    q, k, vv = make_qkv(shape, device="cuda")
    tensors = tensors_for(v, 1, 2, 97, 97, device="cuda", strategies={"slope": "positive"})
    compared = assert_backends_agree(v, q, k, vv, **tensors)       # flex vs eager, float32
    assert compared == ("out", "lse", "grad q", "grad k", "grad v", "grad slope")


@pytest.mark.parametrize("backend", ["flex", "auto"])
def test_gradients_through_an_unchosen_where_branch_stay_finite_on_cuda(backend):
    """where(score > 0, sqrt(score), score): the unchosen sqrt of a negative score has a NaN derivative; eager
    evaluates each branch only where chosen (tests/test_hostile.py), and the GPU backends must not give NaN
    gradients either."""
    torch.manual_seed(0)
    q = torch.randn(1, 2, 256, 64, device="cuda", requires_grad=True)
    k = torch.randn(1, 2, 256, 64, device="cuda", requires_grad=True)
    v = torch.randn(1, 2, 256, 64, device="cuda", requires_grad=True)
    var = al.compile(score="where(score > 0.0, sqrt(score), score)", mask="q_idx >= kv_idx")
    var(q, k, v, backend=backend).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("score", ["min(1.0 / score, 10.0)", "clamp(log(score * score), -1.0, 1.0)",
                                   "sqrt(score * 0.0) + score"])
@pytest.mark.parametrize("backend", ["flex", "auto"])
def test_gradients_through_an_unchosen_select_operand_stay_finite_on_cuda(backend, score):
    """min / max / clamp operands are guarded like where branches (tests/test_select_grads.py on the CPU): a zero
    query row makes every score of its row 0, where 1 / score is inf (unchosen) and sqrt(score * 0.0)'s chain rule
    0 * inf. Gradients finite and equal to eager's."""
    torch.manual_seed(0)
    q = torch.randn(1, 2, 256, 64, device="cuda")
    q[:, :, 7] = 0.0
    k, v = torch.randn(1, 2, 256, 64, device="cuda"), torch.randn(1, 2, 256, 64, device="cuda")
    var = al.compile(score=score, mask="q_idx >= kv_idx")
    grads = []
    for b in (backend, "eager"):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        var(qq, kk, vv, backend=b).sum().backward()
        grads.append([t.grad for t in (qq, kk, vv)])
    for got, want in zip(*grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
