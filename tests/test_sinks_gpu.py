"""GPU: sinks and normalize=False on fa4, flex and auto against an independent float64 computation.

bf16 inputs, head dims 64 and 128, grouped-query attention, odd lengths and decode (q_len < kv_len), rows with no
allowed key; gradients to q, k, v and to the sink's tensor. The reference (written out here, float64 on the GPU)
treats the sink as one extra softmax column that carries no value, and normalize=False as the numerator alone.
Tolerances are those of a bf16 kernel: relative Frobenius error of out and gradients, absolute error of lse.
"""

import math

import pytest
import torch

import attnlang as al

pytestmark = pytest.mark.gpu

OUT_TOL = 1e-2
GRAD_TOL = 2e-2
LSE_TOL = 2e-2


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def _fa4_ok():
    if torch.cuda.get_device_capability() < (9, 0):
        return False
    from attnlang.backends import fa4
    try:
        fa4._flash()
    except Exception:
        return False
    return True


def dense(q, k, v, score_fn, mask_fn, sink_fn, normalize, t):
    """float64: out [B,Hq,Sq,Dv], lse [B,Hq,Sq]; the sink as an extra column (no value)."""
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(hq // hkv, dim=1)
    vv = v.double().repeat_interleave(hq // hkv, dim=1)
    s = q.double() @ kk.transpose(-1, -2) / math.sqrt(d)
    dev = q.device
    bi, hi = torch.arange(b, device=dev).view(b, 1, 1, 1), torch.arange(hq, device=dev).view(1, hq, 1, 1)
    qi, ki = torch.arange(sq, device=dev).view(1, 1, sq, 1), torch.arange(skv, device=dev).view(1, 1, 1, skv)
    s2 = torch.broadcast_to(score_fn(s, bi, hi, qi, ki, sq, skv, t), s.shape)
    allowed = torch.broadcast_to(torch.as_tensor(mask_fn(bi, hi, qi, ki, sq, skv), device=dev), s.shape)
    s3 = torch.where(allowed, s2, torch.tensor(-math.inf, dtype=torch.float64, device=dev))
    cols = s3
    if sink_fn is not None:
        sink = torch.broadcast_to(torch.as_tensor(sink_fn(bi, hi, qi, sq, skv, t), device=dev).double(),
                                  (b, hq, sq, 1))
        cols = torch.cat([s3, sink], dim=-1)
    lse = torch.logsumexp(cols, dim=-1)
    if not normalize:
        return torch.exp(s3) @ vv, lse
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.exp(s3 - safe[..., None]) @ vv, lse


def _plain(s, *_):
    return s


# name -> (compile kwargs, tensor makers (B, Hq, Sq, Skv, device) -> tensor, score_fn, mask_fn, sink_fn, normalize)
CASES = {
    "gpt_oss": (dict(mask="q_idx + kv_len - q_len >= kv_idx & q_idx + kv_len - q_len - kv_idx < 128",
                     sink="sinks[h]"),
                {"sinks": lambda B, H, Sq, Skv, dev: torch.randn(H, device=dev)},
                _plain, lambda b, h, i, j, sq, skv: (i + skv - sq >= j) & (i + skv - sq - j < 128),
                lambda b, h, i, sq, skv, t: t["sinks"][h], True),
    "softmax_plus_one": (dict(mask="q_idx + kv_len - q_len >= kv_idx", sink="0"), {}, _plain,
                         lambda b, h, i, j, sq, skv: i + skv - sq >= j, lambda *a: torch.zeros(()), True),
    "alibi_sinks": (dict(score="score + slope[h] * (kv_idx - q_idx)", mask="q_idx + kv_len - q_len >= kv_idx",
                         sink="sinks[h] * 0.5 + 1.0"),
                    {"sinks": lambda B, H, Sq, Skv, dev: torch.randn(H, device=dev),
                     "slope": lambda B, H, Sq, Skv, dev: 2.0 ** (-8.0 * torch.arange(1, H + 1, device=dev) / H)},
                    lambda s, b, h, i, j, sq, skv, t: s + t["slope"][h].double() * (j - i),
                    lambda b, h, i, j, sq, skv: i + skv - sq >= j,
                    lambda b, h, i, sq, skv, t: t["sinks"][h].double() * 0.5 + 1.0, True),
    "row_sink": (dict(mask="q_idx + kv_len - q_len >= kv_idx", sink="gate[b, q_idx]"),
                 {"gate": lambda B, H, Sq, Skv, dev: torch.randn(B, Sq, device=dev)}, _plain,
                 lambda b, h, i, j, sq, skv: i + skv - sq >= j, lambda b, h, i, sq, skv, t: t["gate"][b, i], True),
    "sigmoid": (dict(score="log(sigmoid(score - log(float(kv_len))))", normalize=False), {},
                lambda s, b, h, i, j, sq, skv, t: torch.log(torch.sigmoid(s - math.log(skv))),
                lambda *a: torch.tensor(True), None, False),
    "empty_rows": (dict(mask="q_idx >= kv_idx + 5", sink="sinks[h]"),
                   {"sinks": lambda B, H, Sq, Skv, dev: torch.randn(H, device=dev)}, _plain,
                   lambda b, h, i, j, sq, skv: i >= j + 5, lambda b, h, i, sq, skv, t: t["sinks"][h], True),
}


def run_case(name, backend, D=64, Hq=4, Hkv=2, Sq=300, Skv=300, grads=True, options=None, B=2, seed=0):
    kwargs, makers, score_fn, mask_fn, sink_fn, normalize = CASES[name]
    var = al.compile(**kwargs)
    torch.manual_seed(seed)
    dev = "cuda"
    q = torch.randn(B, Hq, Sq, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, Skv, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, Skv, D, device=dev, dtype=torch.bfloat16)
    tensors = {n: f(B, Hq, Sq, Skv, dev) for n, f in makers.items()}
    dout = torch.randn(B, Hq, Sq, D, device=dev, dtype=torch.bfloat16)
    dlse = torch.randn(B, Hq, Sq, device=dev)
    learn = {n: t.clone().requires_grad_(grads) for n, t in tensors.items() if n in ("sinks", "gate")}
    fixed = {n: t for n, t in tensors.items() if n not in learn}
    qb, kb, vb = (t.clone().requires_grad_(grads) for t in (q, k, v))
    ctx = torch.enable_grad() if grads else torch.no_grad()
    with ctx:
        out, lse = var(qb, kb, vb, backend=backend, return_lse=True, kernel_options=options, **learn, **fixed)
    qr, kr, vr = (t.double().requires_grad_(grads) for t in (q, k, v))
    ref_learn = {n: t.double().requires_grad_(grads) for n, t in tensors.items() if n in learn}
    ref_out, ref_lse = dense(qr, kr, vr, score_fn, mask_fn, sink_fn, normalize, {**ref_learn, **fixed})
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    rel = float((out.double() - ref_out).norm() / ref_out.norm().clamp_min(1e-12))
    assert rel < OUT_TOL, f"out: rel err {rel:.2e}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    err = float((lse.double() - ref_lse)[finite].abs().max())
    assert err < LSE_TOL, f"lse: max abs err {err:.2e}"
    if not grads:
        return
    loss = (out.float() * dout.float()).sum() + (torch.where(finite, lse, 0.0) * dlse).sum()
    ref_loss = (ref_out * dout.double()).sum() + (torch.where(finite, ref_lse, 0.0) * dlse.double()).sum()
    got = torch.autograd.grad(loss, [qb, kb, vb, *learn.values()])
    want = torch.autograd.grad(ref_loss, [qr, kr, vr, *ref_learn.values()])
    for what, a, b in zip(["dq", "dk", "dv", *learn], got, want):
        assert a is not None and not torch.isnan(a).any(), f"{what}: missing or NaN"
        r = float((a.double() - b).norm() / b.norm().clamp_min(1e-12))
        assert r < GRAD_TOL, f"{what}: rel err {r:.2e}"


SHAPES = [dict(D=64), dict(D=128), dict(D=64, Hq=8, Hkv=2, Sq=64, Skv=300)]
SHAPE_IDS = ["d64", "d128", "gqa4_decode"]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("name", list(CASES))
def test_fa4(name, shape):
    if not _fa4_ok():
        pytest.skip("FA4 needs sm90+ and flash_attn.cute")
    run_case(name, "fa4", **shape)


@pytest.mark.parametrize("name", ["gpt_oss", "alibi_sinks", "softmax_plus_one"])
def test_fa4_without_native_sink(name):
    if not _fa4_ok():
        pytest.skip("FA4 needs sm90+ and flash_attn.cute")
    run_case(name, "fa4", options={"native_sink": False})


def test_fa4_uses_learnable_sink_for_per_head_sinks():
    if not _fa4_ok():
        pytest.skip("FA4 needs sm90+ and flash_attn.cute")
    from attnlang.backends import fa4
    q = torch.randn(1, 4, 256, 64, device="cuda", dtype=torch.bfloat16)
    sinks = torch.randn(4, device="cuda")
    var = al.compile(mask="q_idx >= kv_idx & q_idx - kv_idx < 128", sink="sinks[h]")
    plan = var._plan(q, q, q, None, "fa4", False, None, {"sinks": sinks})
    assert fa4.native_sink(plan)
    _, _, kwargs = fa4.kernel_arguments(q, q, q, plan)
    torch.testing.assert_close(kwargs["learnable_sink"], sinks)
    assert kwargs["mask_mod"] is None and kwargs["window_size"] == (127, 0)
    row = al.compile(sink="gate[b, q_idx]")
    plan = row._plan(q, q, q, None, "fa4", False, None, {"gate": torch.zeros(1, 256, device="cuda")})
    assert not fa4.native_sink(plan)


FLEX_CASES = [(name, 0) for name in CASES] + [("gpt_oss", 1), ("row_sink", 1), ("gpt_oss", 2), ("sigmoid", 2)]


@pytest.mark.parametrize("name, shape", FLEX_CASES, ids=[f"{n}-{SHAPE_IDS[i]}" for n, i in FLEX_CASES])
def test_flex_triton_with_gradients(name, shape):
    run_case(name, "flex", options={"BACKEND": "TRITON"}, **SHAPES[shape])


@pytest.mark.parametrize("name", list(CASES))
def test_flex_inference_default_kernel(name):
    run_case(name, "flex", grads=False)  # FLASH where it fits (bf16, D 64/128, no gradients)


@pytest.mark.parametrize("grads", [True, False], ids=["grads", "inference"])
@pytest.mark.parametrize("name", list(CASES))
def test_auto(name, grads):
    run_case(name, "auto", grads=grads)


def test_auto_keeps_sink_gradients_on_fa4():
    if not _fa4_ok():
        pytest.skip("FA4 needs sm90+ and flash_attn.cute")
    from attnlang.backends import select
    q = torch.randn(1, 4, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    sinks = torch.randn(4, device="cuda", requires_grad=True)
    var = al.compile(mask="q_idx >= kv_idx & q_idx - kv_idx < 128", sink="sinks[h]")
    plan = var._plan(q, q, q, None, "auto", False, None, {"sinks": sinks})
    assert select(q, plan)[0] == "fa4"
