"""GPU agreement of the fa4 backend's varlen path for packed documents (attnlang.backends.fa4_varlen) with the
eager reference in float64: documents with causal, window and position-reading masks and scores, forward and
backward (q, k, v and through lse), multi-batch ids, the tile-list-forward / varlen-backward default, and the
fallback to tile lists for ids that are not contiguous runs. A spy on flash_attn.cute's entry points checks
which path each call took."""

import pytest
import torch

import attnlang as al

pytestmark = pytest.mark.gpu

OUT_TOL = 1e-2      # ||out - ref|| / ||ref|| (bf16 kernel against float64)
GRAD_TOL = 2e-2     # the same for dq, dk, dv
LSE_TOL = 2e-2      # max |lse - ref| over rows with an allowed key


@pytest.fixture(scope="module")
def interface():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("FA4 needs sm90+")
    from attnlang.backends import fa4
    try:
        return fa4._flash()
    except Exception as e:
        pytest.skip(f"flash_attn.cute not importable: {e}")


class Spy:
    """flash_attn.cute's interface, recording ("fwd" / "bwd", varlen?) for the entry points the backend calls."""

    def __init__(self, fa):
        self.fa, self.calls = fa, []
        self.varlen_inputs = []  # (data_ptr, shape, stride) of q / k / v of each varlen call

    def __getattr__(self, name):
        return getattr(self.fa, name)

    def _record(self, args, kwargs):
        if kwargs.get("cu_seqlens_q") is not None:
            self.varlen_inputs.append(tuple((t.data_ptr(), tuple(t.shape), t.stride()) for t in args[:3]))

    def _flash_attn_fwd(self, *args, **kwargs):
        self.calls.append(("fwd", kwargs.get("cu_seqlens_q") is not None))
        self._record(args, kwargs)
        return self.fa._flash_attn_fwd(*args, **kwargs)

    def _flash_attn_bwd(self, *args, **kwargs):
        self.calls.append(("bwd", kwargs.get("cu_seqlens_q") is not None))
        self._record(args, kwargs)
        return self.fa._flash_attn_bwd(*args, **kwargs)

    def flash_attn_func(self, *args, **kwargs):
        self.calls.append(("fwd", False))  # FA4's own autograd function: tile lists both ways
        return self.fa.flash_attn_func(*args, **kwargs)


@pytest.fixture
def spy(interface, monkeypatch):
    from attnlang.backends import fa4
    s = Spy(interface)
    monkeypatch.setattr(fa4, "_flash", lambda: s)
    return s


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


def doc_ids(lengths, device="cuda"):
    return torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                   torch.tensor(lengths, device=device))


def random_lengths(total, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    while sum(out) < total:
        out.append(int(torch.randint(lo, hi + 1, (1,), generator=g)))
    out[-1] -= sum(out) - total
    return [x for x in out if x > 0]


def check(mask, tensors, score="score", B=2, Hq=4, Hkv=2, S=700, D=64, grads=True, lse_grad=False,
          options=None, params=None, seed=0):
    """fa4 (bf16) against eager (float64) on the same inputs ([B, H, S, D]-contiguous): out, lse and, with
    grads, dq / dk / dv. Returns the q / k / v handed to the fa4 backend."""
    variant = al.compile(score=score, mask=mask, params=params)
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, Hq, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    dout = torch.randn(B, Hq, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    dlse = torch.randn(B, Hq, S, device="cuda", dtype=torch.float32, generator=g)
    qr, kr, vr = (t.double().requires_grad_(grads) for t in (q, k, v))
    ref, ref_lse = variant(qr, kr, vr, backend="eager", return_lse=True, **tensors)
    qb, kb, vb = (t.detach().requires_grad_(grads) for t in (q, k, v))
    out, lse = variant(qb, kb, vb, backend="fa4", return_lse=True, kernel_options=options, **tensors)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert _rel(out, ref) < OUT_TOL, f"out: rel err {_rel(out, ref):.2e}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "rows with no allowed key differ"
    err = float((lse.double() - ref_lse.double())[finite].abs().max()) if finite.any() else 0.0
    assert err < LSE_TOL, f"lse: max abs err {err:.2e}"
    if grads:
        def loss(o, l_):
            value = (o.double() * dout.double()).sum()
            if lse_grad:
                value = value + (l_.double().where(finite, 0.0) * dlse.double()).sum()
            return value
        loss(ref, ref_lse).backward()
        loss(out, lse).backward()
        for name, a, b in (("dq", qb, qr), ("dk", kb, kr), ("dv", vb, vr)):
            assert not torch.isnan(a.grad).any(), f"{name} has NaN"
            assert _rel(a.grad, b.grad) < GRAD_TOL, f"{name}: rel err {_rel(a.grad, b.grad):.2e}"
    return qb, kb, vb


DOC = "doc[q_idx] == doc[kv_idx]"
LENGTHS = [130, 1, 200, 64, 5, 300]  # 700 positions; a document of one token; none on a 128 boundary


@pytest.mark.parametrize("options, expect", [
    ({"varlen": True}, [("fwd", True), ("bwd", True)]),
    (None, [("fwd", False), ("bwd", True)]),            # default at 2 x 700 tokens: tile-list forward
])
def test_causal_documents(spy, options, expect):
    check(f"{DOC} & q_idx >= kv_idx", {"doc": doc_ids(LENGTHS)}, options=options)
    assert spy.calls == expect


def test_causal_documents_gradient_through_lse(spy):
    check(f"{DOC} & q_idx >= kv_idx", {"doc": doc_ids(LENGTHS)}, lse_grad=True)
    assert spy.calls == [("fwd", False), ("bwd", True)]
    spy.calls.clear()
    check(f"{DOC} & q_idx >= kv_idx", {"doc": doc_ids(LENGTHS)}, lse_grad=True, options={"varlen": True}, seed=1)
    assert spy.calls == [("fwd", True), ("bwd", True)]


def test_whole_documents_mha_d128(spy):
    check(DOC, {"doc": doc_ids(LENGTHS)}, Hq=2, Hkv=2, D=128, options={"varlen": True})
    assert ("bwd", True) in spy.calls


@pytest.mark.parametrize("mask", [
    f"{DOC} & 0 <= q_idx - kv_idx < 37",                     # window flags inside each document
    f"{DOC} & (kv_idx % 3 == 0 | q_idx >= kv_idx)",          # a mask_mod reading global positions
    f"{DOC} & (kv_idx < 150 | q_idx >= kv_idx)",             # a prefix: only the documents it reaches
    f"{DOC} & kv_idx <= q_idx + kv_len - q_len",            # bottom-right causal, q_len == kv_len
])
def test_masks_inside_documents(spy, mask):
    check(mask, {"doc": doc_ids(LENGTHS)}, options={"varlen": True})
    assert spy.calls == [("fwd", True), ("bwd", True)]


@pytest.mark.parametrize("score, tensors", [
    ("score + bias[kv_idx]", {"bias": "kv"}),                           # an aux read at the global kv_idx
    ("score * (1.0 + 0.05 * float(kv_idx % 11))", {}),                  # arithmetic on global positions
    ("score + slope[h] * (kv_idx - q_idx)", {"slope": "h"}),           # ALiBi (baked table)
    ("30 * tanh(score / 30)", {}),
])
def test_scores_reading_positions(spy, score, tensors):
    named = {"doc": doc_ids(LENGTHS)}
    for name, kind in tensors.items():
        g = torch.Generator(device="cuda").manual_seed(3)
        named[name] = (torch.randn(700, device="cuda", generator=g) if kind == "kv" else
                       torch.exp2(-torch.arange(1, 5, device="cuda", dtype=torch.float32)))
    check(f"{DOC} & q_idx >= kv_idx", named, score=score, options={"varlen": True})
    assert spy.calls == [("fwd", True), ("bwd", True)]


def test_batched_ids_with_a_batch_dependent_score(spy):
    S = 700
    doc = torch.stack([doc_ids(LENGTHS), doc_ids(random_lengths(S, 20, 400, seed=1))])
    bias = torch.randn(2, S, device="cuda")
    check("doc[b, q_idx] == doc[b, kv_idx] & q_idx >= kv_idx", {"doc": doc, "bias": bias},
          score="score + bias[b, kv_idx]", options={"varlen": True})
    assert spy.calls == [("fwd", True), ("bwd", True)]


def test_batched_ids_default_directions(spy):
    doc = torch.stack([doc_ids(LENGTHS), doc_ids(random_lengths(700, 20, 400, seed=2))])
    check("doc[b, q_idx] == doc[b, kv_idx] & q_idx >= kv_idx", {"doc": doc}, B=2, Hq=8, Hkv=2)
    assert spy.calls == [("fwd", False), ("bwd", True)]


def test_random_lengths_like_the_benchmark(spy):
    lengths = random_lengths(4096, 64, 3000, seed=0)
    check(f"{DOC} & q_idx >= kv_idx", {"doc": doc_ids(lengths)}, B=2, Hq=8, Hkv=2, S=4096, D=128,
          options={"varlen": True})
    assert spy.calls == [("fwd", True), ("bwd", True)]


def test_inference_paths(spy):
    check(f"{DOC} & q_idx >= kv_idx", {"doc": doc_ids(LENGTHS)}, grads=False)
    assert spy.calls == [("fwd", False)]  # short pack, no backward: the tile-list path alone
    spy.calls.clear()
    check(f"{DOC} & q_idx >= kv_idx", {"doc": doc_ids(LENGTHS)}, grads=False, options={"varlen": True})
    assert spy.calls == [("fwd", True)]


def test_long_pack_forward_runs_varlen_by_default(spy):
    from attnlang.backends.fa4_varlen import VARLEN_FORWARD_MIN_TOKENS
    S = VARLEN_FORWARD_MIN_TOKENS
    check(f"{DOC} & q_idx >= kv_idx", {"doc": doc_ids(random_lengths(S, 64, 3000, seed=4))}, B=1, Hq=2, Hkv=1,
          S=S, grads=False)
    assert spy.calls == [("fwd", True)]


@pytest.mark.parametrize("ids", ["interleaved", "returning"])
def test_ids_in_several_runs_fall_back_to_tile_lists(spy, ids):
    pos = torch.arange(700, device="cuda")
    doc = (pos // 50) % 3 if ids == "interleaved" else torch.where((pos > 100) & (pos < 300), 1, 0)
    check(f"{DOC} & q_idx >= kv_idx", {"doc": doc}, options={"varlen": True})
    assert all(not varlen for _, varlen in spy.calls), spy.calls


def test_varlen_false_keeps_tile_lists(spy):
    check(f"{DOC} & q_idx >= kv_idx", {"doc": doc_ids(LENGTHS)}, options={"varlen": False})
    assert all(not varlen for _, varlen in spy.calls), spy.calls


def test_modified_ids_are_read_again(spy):
    doc = doc_ids(LENGTHS)
    check(f"{DOC} & q_idx >= kv_idx", {"doc": doc}, options={"varlen": True})
    doc[300:] = 99  # in place: the cached cu_seqlens must not be reused
    check(f"{DOC} & q_idx >= kv_idx", {"doc": doc}, options={"varlen": True}, seed=5)


def test_folded_batch_into_heads_no_copy(spy):
    """Ids shared by the batch, [B, H, S, D]-contiguous q / k / v, GQA: one varlen call over S tokens with B * H
    heads and B * Hkv kv heads (FA4's grouped varlen backward: no modifier, so no "expand" guard), reading the
    caller's storage (no copy), forward and backward."""
    from attnlang.backends import fa4, fa4_varlen
    B, Hq, Hkv, S, D = 4, 8, 2, 1024, 128
    doc = doc_ids(random_lengths(S, 20, 400, seed=6))
    mask = f"{DOC} & q_idx >= kv_idx"
    q, k, v = check(mask, {"doc": doc}, B=B, Hq=Hq, Hkv=Hkv, S=S, D=D, options={"varlen": True})
    assert spy.calls == [("fwd", True), ("bwd", True)]
    assert len(spy.varlen_inputs) == 2
    for got in spy.varlen_inputs:
        for (ptr, shape, stride), t, H, name in zip(got, (q, k, v), (Hq, Hkv, Hkv), "qkv"):
            assert ptr == t.data_ptr(), f"{name} was copied"
            assert shape == (S, B * H, D) and stride == (D, S * D, 1), (name, shape, stride)
    plan = al.compile(mask=mask)._plan(q, k, v, None, "fa4", True, {"varlen": True}, {"doc": doc})
    text = fa4_varlen.describe(q, k, v, plan, fa4.VARLEN_HOST)
    assert "folded batch into heads (no copy)" in text, text
