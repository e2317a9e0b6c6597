"""The eager backend against an independent dense float64 computation written out by hand for each LANGUAGE.md
example (B=2, Hq=4, Hkv=2, lengths that are not multiples of 16, decode), gradients included; fully masked rows;
dtypes; the integer semantics of // % int(); chunking; non-finite scores."""

import math

import pytest
import torch

import attnlang as al
import attnlang.backends.eager as eager

B, HQ, HKV, D = 2, 4, 2, 8
SQ, SKV = 37, 45


def make_qkv(sq=SQ, skv=SKV, dtype=torch.float64, seed=0, hq=HQ, hkv=HKV, b=B, d=D, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, skv, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, skv, d, generator=g, dtype=torch.float64).to(dtype)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def grids(b, hq, sq, skv):
    return (torch.arange(b).view(b, 1, 1, 1), torch.arange(hq).view(1, hq, 1, 1),
            torch.arange(sq).view(1, 1, sq, 1), torch.arange(skv).view(1, 1, 1, skv))


def dense(q, k, v, score_fn, mask_fn, scale=None):
    """Softmax attention written out densely in float64: out [B,Hq,Sq,Dv], lse [B,Hq,Sq]."""
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = 1 / math.sqrt(d) if scale is None else scale
    kk = k.double().repeat_interleave(group, dim=1)  # query head h reads key head h // group
    vv = v.double().repeat_interleave(group, dim=1)
    s = scale * q.double() @ kk.transpose(-1, -2)
    bi, hi, qi, ki = grids(b, hq, sq, skv)
    s2 = torch.broadcast_to(score_fn(s, bi, hi, qi, ki), s.shape)
    allowed = torch.broadcast_to(mask_fn(bi, hi, qi, ki), s.shape)
    s3 = torch.where(allowed, s2, torch.tensor(-math.inf, dtype=torch.float64))
    lse = torch.logsumexp(s3, dim=-1)
    empty = lse == -math.inf  # no allowed key, or every allowed score -inf
    lse_safe = torch.where(empty, torch.zeros_like(lse), lse)
    p = torch.exp(s3 - lse_safe[..., None])
    return p @ vv, torch.where(empty, torch.full_like(lse, -math.inf), lse)


def doc_ids(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randint(0, 5, (n,), generator=g)).values


WINDOW, CAP, PREFIX = 8, 2.0, 10
SLOPE = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)


# name, score, mask, params, tensors(sq, skv), dense score_fn(s, b, h, qi, ki, tensors), dense mask_fn
EXAMPLES = [
    ("causal", "score", "q_idx >= kv_idx", None, lambda sq, skv: {},
     lambda s, b, h, qi, ki, t: s, lambda b, h, qi, ki, t: qi >= ki),
    ("sliding window", "score", "0 <= q_idx - kv_idx < window", {"window": WINDOW}, lambda sq, skv: {},
     lambda s, b, h, qi, ki, t: s, lambda b, h, qi, ki, t: (qi - ki >= 0) & (qi - ki < WINDOW)),
    ("alibi", "score + slope[h] * (kv_idx - q_idx)", "q_idx >= kv_idx", None,
     lambda sq, skv: {"slope": SLOPE.clone()},
     lambda s, b, h, qi, ki, t: s + t["slope"].view(1, -1, 1, 1) * (ki - qi), lambda b, h, qi, ki, t: qi >= ki),
    ("softcap", "cap * tanh(score / cap)", "q_idx >= kv_idx", {"cap": CAP}, lambda sq, skv: {},
     lambda s, b, h, qi, ki, t: CAP * torch.tanh(s / CAP), lambda b, h, qi, ki, t: qi >= ki),
    ("document", "score", "doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx", None,
     lambda sq, skv: {"doc": doc_ids(max(sq, skv))},
     lambda s, b, h, qi, ki, t: s,
     lambda b, h, qi, ki, t: (t["doc"][qi] == t["doc"][ki]) & (qi >= ki)),
    ("prefix lm", "score", "kv_idx < prefix | q_idx >= kv_idx", {"prefix": PREFIX}, lambda sq, skv: {},
     lambda s, b, h, qi, ki, t: s, lambda b, h, qi, ki, t: (ki < PREFIX) | (qi >= ki)),
    ("decode causal", "score", "kv_idx <= q_idx + kv_len - q_len", None, lambda sq, skv: {},
     lambda s, b, h, qi, ki, t: s, lambda b, h, qi, ki, t: ki <= qi + (ki.numel() - qi.numel())),
]
LENGTHS = [(SQ, SKV), (5, SKV), (SKV, SQ)]


def run_both(example, sq, skv, dtype=torch.float64, requires_grad=False, backend="eager"):
    name, score, mask, params, make_tensors, score_fn, mask_fn = example
    var = al.compile(score, mask, params)
    q, k, v = make_qkv(sq, skv, dtype, requires_grad=requires_grad)
    tensors = make_tensors(sq, skv)
    if requires_grad:
        for t in tensors.values():
            if t.is_floating_point():
                t.requires_grad_(True)
    out, lse = var(q, k, v, backend=backend, return_lse=True, **tensors)
    ref_out, ref_lse = dense(q, k, v, lambda s, b, h, qi, ki: score_fn(s, b, h, qi, ki, tensors),
                             lambda b, h, qi, ki: mask_fn(b, h, qi, ki, tensors))
    return (q, k, v, tensors), (out, lse), (ref_out, ref_lse)


@pytest.mark.parametrize("sq, skv", LENGTHS)
@pytest.mark.parametrize("example", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_examples_match_dense_float64(example, sq, skv):
    _, (out, lse), (ref_out, ref_lse) = run_both(example, sq, skv)
    assert out.dtype == torch.float64 and out.shape == (B, HQ, sq, D)
    assert lse.dtype == torch.float64 and lse.shape == (B, HQ, sq)  # float64 in, float64 lse
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)  # float64 lse: float64-accurate
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))


@pytest.mark.parametrize("sq, skv", [(SQ, SKV), (5, SKV)])
@pytest.mark.parametrize("example", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_example_gradients_match_dense_float64(example, sq, skv):
    (q, k, v, tensors), (out, lse), (ref_out, ref_lse) = run_both(example, sq, skv, requires_grad=True)
    inputs = [q, k, v] + [t for t in tensors.values() if t.requires_grad]
    g = torch.Generator().manual_seed(5)
    d_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    d_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    finite = torch.isfinite(ref_lse)
    loss = (out * d_out).sum() + (torch.where(finite, lse.double(), 0.0) * d_lse).sum()
    ref_loss = (ref_out * d_out).sum() + (torch.where(finite, ref_lse, 0.0) * d_lse).sum()
    grads = torch.autograd.grad(loss, inputs)
    ref_grads = torch.autograd.grad(ref_loss, inputs)
    for got, want in zip(grads, ref_grads):
        assert not torch.isnan(got).any()
        # lse is returned in float32, so its part of the gradient is float32-accurate
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if example[0] == "alibi":
        assert grads[3].abs().sum() > 0  # the slope really gets a gradient


def test_gradcheck_alibi_small():
    var = al.compile("score + slope[h] * (kv_idx - q_idx)", "q_idx >= kv_idx")
    q, k, v = make_qkv(3, 5, hq=2, hkv=1, b=1, d=2, requires_grad=True)
    slope = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)

    def f(q, k, v, slope):
        out, lse = var(q, k, v, backend="eager", return_lse=True, slope=slope)
        return out, lse.double()
    # lse is float32 by contract: check out's gradient exactly and lse's loosely
    assert torch.autograd.gradcheck(lambda *a: f(*a)[0], (q, k, v, slope))


FULLY_MASKED = [
    ("score", "kv_idx < q_idx", [0]),                     # row 0 has no key
    ("score", "False", list(range(SQ))),
    ("score", "q_idx < 3 & kv_idx >= 0", list(range(3, SQ))),
    ("where(q_idx == 2, -inf, score)", "True", [2]),      # every allowed score -inf
    ("-inf", "True", list(range(SQ))),
]


@pytest.mark.parametrize("score, mask, rows", FULLY_MASKED)
def test_fully_masked_rows(score, mask, rows):
    var = al.compile(score, mask)
    q, k, v = make_qkv(requires_grad=True)
    out, lse = var(q, k, v, backend="eager", return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert (out[:, :, rows] == 0).all()
    assert (lse[:, :, rows] == -math.inf).all()
    others = [i for i in range(SQ) if i not in rows]
    assert torch.isfinite(lse[:, :, others]).all()
    loss = out.sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()
    grads = torch.autograd.grad(loss, (q, k, v), allow_unused=True)  # a score without `score` ignores q and k
    dq, dk, dv = (torch.zeros_like(t) if g is None else g for g, t in zip(grads, (q, k, v)))
    for g in (dq, dk, dv):
        assert not torch.isnan(g).any()
    assert (dq[:, :, rows] == 0).all()
    if not others:
        assert (dk == 0).all() and (dv == 0).all()


def test_masked_nan_scores_do_not_leak():
    # log of a negative number at masked positions only: forward and backward stay finite
    var = al.compile("where(q_idx >= kv_idx, score, log(-1.0))", "q_idx >= kv_idx")
    q, k, v = make_qkv(requires_grad=True)
    out = var(q, k, v, backend="eager")
    ref, _ = dense(q, k, v, lambda s, *_: s, lambda b, h, qi, ki: qi >= ki)
    torch.testing.assert_close(out, ref)
    for g in torch.autograd.grad(out.sum(), (q, k, v)):
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("score, tensors", [
    ("score + inf", {}),
    ("score * 1e308 * 1e308", {}),
    ("log(score - score - 1.0)", {}),
    ("score + x[kv_idx]", {"x": torch.tensor([0.0] * 44 + [math.inf], dtype=torch.float64)}),
    ("score + x[kv_idx]", {"x": torch.tensor([0.0] * 44 + [math.nan], dtype=torch.float64)}),
])
def test_nonfinite_score_at_an_allowed_position_is_an_error(score, tensors):
    var = al.compile(score, "True")
    q, k, v = make_qkv()
    with pytest.raises(al.AttnLangError, match="allowed position"):
        var(q, k, v, backend="eager", **tensors)


def test_nonfinite_score_at_a_masked_position_is_fine():
    var = al.compile("score + x[kv_idx]", "kv_idx < 44")
    q, k, v = make_qkv()
    x = torch.tensor([0.0] * 44 + [math.inf], dtype=torch.float64)
    out = var(q, k, v, backend="eager", x=x)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2), (torch.float32, 1e-5)])
def test_low_precision_dtypes(dtype, tol):
    example = EXAMPLES[2]  # alibi: a float tensor bound by name
    (q, k, v, tensors), (out, lse), (ref_out, ref_lse) = run_both(example, SQ, SKV, dtype=dtype)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=tol, atol=tol)


def test_low_precision_named_tensor_and_grad():
    var = al.compile("score + bias[h, kv_idx]", "q_idx >= kv_idx")
    q, k, v = make_qkv(dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(HQ, SKV, dtype=torch.float32, requires_grad=True)
    out, lse = var(q, k, v, backend="eager", return_lse=True, bias=bias)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    gq, gb = torch.autograd.grad(out.float().sum(), (q, bias))
    assert gq.dtype == torch.bfloat16 and gb.dtype == torch.float32
    assert torch.isfinite(gb).all() and gb.abs().sum() > 0


def test_scale():
    var = al.compile(mask="q_idx >= kv_idx")
    q, k, v = make_qkv()
    for scale in (0.1, 2.0, -1.0):
        out, lse = var(q, k, v, backend="eager", scale=scale, return_lse=True)
        ref_out, ref_lse = dense(q, k, v, lambda s, *_: s, lambda b, h, qi, ki: qi >= ki, scale=scale)
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(lse, ref_lse)  # float64 inputs: float64 lse


# ----- integer semantics, checked against Python itself -----

def python_grid(fn, sq, skv):
    return torch.tensor([[fn(i, j) for j in range(skv)] for i in range(sq)], dtype=torch.float64)


INT_SEMANTICS = [
    ("float((q_idx - kv_idx) // 3)", lambda i, j: float((i - j) // 3)),
    ("float((q_idx - kv_idx) % 7)", lambda i, j: float((i - j) % 7)),
    ("float((q_idx - kv_idx) % -4)", lambda i, j: float((i - j) % -4)),
    ("float((q_idx - kv_idx) // -5)", lambda i, j: float((i - j) // -5)),
    ("float(-7 // 2) + float(-7 % 2) * 10.0", lambda i, j: float(-7 // 2) + float(-7 % 2) * 10.0),
    ("(q_idx - kv_idx) / 4", lambda i, j: (i - j) / 4),
    ("float(q_idx) / 4 - q_idx // 4", lambda i, j: i / 4 - i // 4),
    ("float(int((q_idx - kv_idx) / 3))", lambda i, j: float(int((i - j) / 3))),
    ("float(int(-2.5)) + float(int(2.5)) * 10.0", lambda i, j: float(int(-2.5)) + float(int(2.5)) * 10.0),
    ("(float(q_idx) - 10.5) // 2.0", lambda i, j: (i - 10.5) // 2.0),
    ("(float(kv_idx) - 20.0) % 3.5", lambda i, j: (j - 20.0) % 3.5),
    ("float(abs(q_idx - kv_idx) ** 2 % 11)", lambda i, j: float(abs(i - j) ** 2 % 11)),
    ("float(min(q_idx, kv_idx) - max(q_idx, 7))", lambda i, j: float(min(i, j) - max(i, 7))),
    ("float(clamp(q_idx - kv_idx, -3, 4))", lambda i, j: float(min(max(i - j, -3), 4))),
    ("float(sign(q_idx - kv_idx))", lambda i, j: float((i > j) - (i < j))),
    ("floor((q_idx - kv_idx) / 3) + ceil((q_idx - kv_idx) / 3)",
     lambda i, j: math.floor((i - j) / 3) + math.ceil((i - j) / 3)),
    ("where(q_idx > kv_idx, 1, 2.5)", lambda i, j: 1.0 if i > j else 2.5),
    ("float(q_idx > kv_idx) - float(q_idx == kv_idx)", lambda i, j: float(i > j) - float(i == j)),
    ("exp2(float(q_idx % 3)) + log2(float(kv_idx + 1))", lambda i, j: 2.0 ** (i % 3) + math.log2(j + 1)),
    ("sqrt(float(q_idx)) + sigmoid(float(kv_idx) - 20.0)",
     lambda i, j: math.sqrt(i) + 1 / (1 + math.exp(-(j - 20.0)))),
    ("2.0 ** (q_idx % 4 - 2)", lambda i, j: 2.0 ** (i % 4 - 2)),
    ("-2 ** 2 + q_idx * 0", lambda i, j: -2 ** 2 + i * 0),
    # int arithmetic stays int64: 2**24 + 1 is not a float32
    ("float(q_idx + 16777217 - 16777216 - kv_idx)", lambda i, j: float(i + 16777217 - 16777216 - j)),
]


@pytest.mark.parametrize("expr, fn", INT_SEMANTICS, ids=[e for e, _ in INT_SEMANTICS])
def test_semantics_match_python(expr, fn):
    # score = expr exactly: a zero query makes q·k vanish, and `0.0 * score` keeps the score's shape
    var = al.compile(f"{expr} + 0.0 * score", "True")
    sq, skv = 13, 29
    q, k, v = make_qkv(sq, skv)
    v_id = torch.eye(skv, dtype=torch.float64).expand(B, HKV, skv, skv)
    out, lse = var(q, k, v_id, backend="eager", return_lse=True)
    want = python_grid(fn, sq, skv)
    # out with V = identity is softmax(scores), and lse + log(softmax) recovers the scores themselves
    got = torch.log(out) + lse.double()[..., None]
    torch.testing.assert_close(got, want.expand_as(got), rtol=1e-6, atol=1e-5)


MASK_SEMANTICS = [
    ("(q_idx - kv_idx) // 4 == -2", lambda i, j: (i - j) // 4 == -2),
    ("(q_idx - kv_idx) % 5 == 3", lambda i, j: (i - j) % 5 == 3),
    ("int(float(q_idx - kv_idx) / 4.0) == -1", lambda i, j: int((i - j) / 4.0) == -1),
    ("q_idx + 16777217 == kv_idx + 16777216", lambda i, j: i + 16777217 == j + 16777216),
    ("q_idx * 3 / 2 == kv_idx", lambda i, j: i * 3 / 2 == j),
    ("not (q_idx < kv_idx or kv_idx > 10) and q_idx != 3", lambda i, j: not (i < j or j > 10) and i != 3),
    ("0 <= q_idx - kv_idx < 4", lambda i, j: 0 <= i - j < 4),
    ("(q_idx > 5) == (kv_idx > 5)", lambda i, j: (i > 5) == (j > 5)),
    ("q_idx >= kv_idx & q_idx - kv_idx < 3", lambda i, j: i >= j and i - j < 3),
]


@pytest.mark.parametrize("mask, fn", MASK_SEMANTICS, ids=[m for m, _ in MASK_SEMANTICS])
def test_masks_match_python(mask, fn):
    var = al.compile(mask=mask)
    sq, skv = 13, 29
    q, k, v = make_qkv(sq, skv)
    _, lse = var(q, k, v, backend="eager", return_lse=True)
    allowed = python_grid(lambda i, j: float(fn(i, j)), sq, skv).bool()
    ref_out, ref_lse = dense(q, k, v, lambda s, *_: s, lambda b, h, qi, ki: allowed[qi, ki])
    torch.testing.assert_close(lse, ref_lse)


def test_positions_b_and_h():
    var = al.compile("score + float(b * 10 + h)", "(q_idx + b + h) % 3 != 0")
    q, k, v = make_qkv()
    out, lse = var(q, k, v, backend="eager", return_lse=True)
    ref_out, ref_lse = dense(q, k, v, lambda s, b, h, qi, ki: s + (b * 10 + h),
                             lambda b, h, qi, ki: (qi + b + h) % 3 != 0)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


# ----- chunking -----

@pytest.mark.parametrize("chunk", [1, 3, 16, 36, 37, 100])
def test_chunk_size_gives_identical_results(chunk, monkeypatch):
    example = EXAMPLES[2]
    (q, k, v, tensors), (out, lse), _ = run_both(example, SQ, SKV, requires_grad=True)
    grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v, tensors["slope"]))
    monkeypatch.setattr(eager, "_SCORE_BUDGET", chunk * B * HQ * SKV)
    (q2, k2, v2, t2), (out2, lse2), _ = run_both(example, SQ, SKV, requires_grad=True)
    grads2 = torch.autograd.grad(out2.sum() + lse2.sum(), (q2, k2, v2, t2["slope"]))
    torch.testing.assert_close(out2, out, rtol=1e-13, atol=1e-13)
    assert torch.equal(lse2, lse) or torch.allclose(lse2, lse, rtol=1e-6, atol=1e-6)
    for g2, g in zip(grads2, grads):
        torch.testing.assert_close(g2, g, rtol=1e-10, atol=1e-10)


def test_chunk_size_argument():
    var = al.compile("score + slope[h] * (kv_idx - q_idx)", "q_idx >= kv_idx")
    q, k, v = make_qkv()
    slope = SLOPE.clone()
    plan = var._plan(q, k, v, None, "eager", True, None, {"slope": slope})
    full = eager.attention(q, k, v, plan)
    for chunk in (1, 5, 37):
        got = eager.attention(q, k, v, plan, chunk_size=chunk)
        torch.testing.assert_close(got[0], full[0], rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(got[1], full[1])


def test_reference_and_gqa_mapping():
    # with Hkv = 1 every query head must read the one key head; with Hkv = Hq each its own
    var = al.compile(mask="q_idx >= kv_idx")
    for hkv in (1, 2, 4):
        q, k, v = make_qkv(hkv=hkv)
        out = al.reference(q, k, v, var)
        ref, _ = dense(q, k, v, lambda s, *_: s, lambda b, h, qi, ki: qi >= ki)
        torch.testing.assert_close(out, ref)


# ----- no NaN gradients from masked or -inf positions -----

@pytest.mark.parametrize("score, fill", [
    ("score + log(x[kv_idx])", 0.0),        # log(0) = -inf where masked: d/dx = 1/0
    ("score + sqrt(x[kv_idx])", 0.0),       # d/dx sqrt at 0 = inf
    ("score + 1.0 / x[kv_idx]", 0.0),
    ("score * x[kv_idx]", math.inf),        # d/dscore = inf where masked
])
def test_masked_positions_leak_no_nan_into_gradients(score, fill):
    var = al.compile(score, "kv_idx < 40")
    q, k, v = make_qkv(requires_grad=True)
    x = torch.rand(SKV, dtype=torch.float64) + 0.5
    x_safe = x.clone().requires_grad_(True)
    x[40:] = fill
    x.requires_grad_(True)
    out, lse = var(q, k, v, backend="eager", return_lse=True, x=x)
    grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v, x))
    for g in grads:
        assert torch.isfinite(g).all()
    assert (grads[3][40:] == 0).all()
    # the masked entries of x do not matter: the same call with harmless values there gives the same gradients
    out2, lse2 = var(q, k, v, backend="eager", return_lse=True, x=x_safe)
    torch.testing.assert_close(out, out2)
    grads2 = torch.autograd.grad(out2.sum() + lse2.sum(), (q, k, v, x_safe))
    for g, g2 in zip(grads[:3], grads2[:3]):
        torch.testing.assert_close(g, g2)
    torch.testing.assert_close(grads[3][:40], grads2[3][:40])


def test_rows_of_minus_inf_scores_have_zero_gradients():
    var = al.compile("score + x[q_idx]", "q_idx >= kv_idx")
    q, k, v = make_qkv(requires_grad=True)
    x = torch.randn(SQ, dtype=torch.float64)
    x[5] = -math.inf
    x.requires_grad_(True)
    out, lse = var(q, k, v, backend="eager", return_lse=True, x=x)
    assert (out[:, :, 5] == 0).all() and (lse[:, :, 5] == -math.inf).all()
    loss = out.sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()
    dq, dk, dv, dx = torch.autograd.grad(loss, (q, k, v, x))
    for g in (dq, dk, dv, dx):
        assert torch.isfinite(g).all()
    assert (dq[:, :, 5] == 0).all() and dx[5] == 0
    ref_out, ref_lse = dense(q, k, v, lambda s, b, h, qi, ki: s + x[qi], lambda b, h, qi, ki: qi >= ki)
    torch.testing.assert_close(out, ref_out)


@pytest.mark.parametrize("chunk", [1, 7, 100])
def test_chunking_of_the_guarded_gradient_path(chunk, monkeypatch):
    var = al.compile("score + log(x[kv_idx])", "q_idx >= kv_idx")
    q, k, v = make_qkv(requires_grad=True)
    x = (torch.rand(SKV, dtype=torch.float64) + 0.5).requires_grad_(True)
    ref_out, ref_lse = dense(q, k, v, lambda s, b, h, qi, ki: s + torch.log(x[ki]), lambda b, h, qi, ki: qi >= ki)
    want = torch.autograd.grad(ref_out.sum() + ref_lse.sum(), (q, k, v, x))
    monkeypatch.setattr(eager, "_SCORE_BUDGET", chunk * B * HQ * SKV)
    out, lse = var(q, k, v, backend="eager", return_lse=True, x=x)
    torch.testing.assert_close(out, ref_out)
    got = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v, x))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_a_call_frees_its_tensors_on_return_without_the_cyclic_collector():
    # lower_torch.evaluate's nested functions reached one another through their closures (visit calls itself): a
    # reference cycle holding the names (the [B, H, Sq, Skv] score) and the named tensors until Python's cyclic
    # collector ran, which tensor bytes do not prompt
    import gc
    import weakref
    variant = al.compile(score="score + bias[kv_idx] + where(q_idx > 2, 1.0, 0.0)", mask="q_idx >= kv_idx")
    q = torch.randn(1, 2, 6, 4, requires_grad=True)
    bias = torch.randn(6)
    was = gc.isenabled()
    gc.disable()
    try:
        out = variant(q, q, q, backend="eager", bias=bias)
        out.sum().backward()
        refs = [weakref.ref(bias), weakref.ref(out)]
        del bias, out
        assert [r() for r in refs] == [None, None]
    finally:
        if was:
            gc.enable()
